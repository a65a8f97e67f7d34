use super::*;
use tokio::io::{AsyncWriteExt, DuplexStream};

/// A client frame (masked, as clients send them) with `opcode` and `payload`.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut bytes = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => bytes.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            bytes.push(0x80 | 126);
            bytes.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            bytes.push(0x80 | 127);
            bytes.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    bytes.extend_from_slice(&mask);
    bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    bytes
}

/// A server session's stream over one end of a pipe, the client's end.
async fn pair() -> (WebSocketStream<FrameGate<DuplexStream>>, DuplexStream) {
    let (client, server) = tokio::io::duplex(1 << 20);
    let gate = FrameGate::new(server, Bytes::new());
    let stream = WebSocketStream::from_raw_socket(gate, Role::Server, None).await;
    (stream, client)
}

async fn text(stream: &mut WebSocketStream<FrameGate<DuplexStream>>) -> String {
    match timeout(Duration::from_secs(5), stream.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => text.to_string(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// Whether the stream yields nothing within 50 ms.
async fn nothing_yet(stream: &mut WebSocketStream<FrameGate<DuplexStream>>) -> bool {
    timeout(Duration::from_millis(50), stream.next())
        .await
        .is_err()
}

#[test]
fn frame_headers_are_read_whole_or_not_at_all() {
    let short = frame(true, 1, b"hi");
    assert_eq!(
        FrameHeader::parse(&short),
        Some(FrameHeader {
            fin: true,
            opcode: 1,
            length: short.len() as u64
        })
    );
    let medium = frame(false, 2, &[0; 300]);
    assert_eq!(FrameHeader::parse(&medium).unwrap().length, 2 + 2 + 4 + 300);
    let long = frame(true, 0, &[0; 70_000]);
    assert_eq!(
        FrameHeader::parse(&long).unwrap().length,
        2 + 8 + 4 + 70_000
    );
    // Unmasked (as a server sends): no mask key.
    assert_eq!(FrameHeader::parse(&[0x89, 0x00]).unwrap().length, 2);
    for cut in [0, 1] {
        assert_eq!(FrameHeader::parse(&short[..cut]), None);
    }
    for cut in 2..4 {
        assert_eq!(FrameHeader::parse(&medium[..cut]), None, "cut at {cut}");
    }
    for cut in 2..10 {
        assert_eq!(FrameHeader::parse(&long[..cut]), None, "cut at {cut}");
    }
    // A length no one can send does not overflow.
    let mut huge = vec![0x82, 0xff];
    huge.extend_from_slice(&u64::MAX.to_be_bytes());
    assert_eq!(FrameHeader::parse(&huge).unwrap().length, u64::MAX);
}

#[tokio::test]
async fn bytes_past_a_message_stay_in_the_gate_to_travel_with_the_socket() {
    let (mut stream, mut client) = pair().await;
    let second = frame(true, 1, b"two");
    let mut wire = frame(true, 1, b"one");
    wire.extend_from_slice(&second[..3]);
    client.write_all(&wire).await.unwrap();
    assert_eq!(text(&mut stream).await, "one");
    assert!(nothing_yet(&mut stream).await);
    let gate = stream.get_ref();
    assert!(gate.at_boundary(), "between two messages");
    assert_eq!(&gate.pending[..], &second[..3], "the next frame's start");
    // Served once the rest comes, from where it stopped.
    client.write_all(&second[3..]).await.unwrap();
    assert_eq!(text(&mut stream).await, "two");
    assert!(stream.get_ref().at_boundary());
    assert!(stream.get_ref().pending.is_empty());
}

#[tokio::test]
async fn a_frame_or_a_fragmented_message_under_way_is_not_a_boundary() {
    let (mut stream, mut client) = pair().await;
    // A short frame read in part stays in the gate, the session at rest.
    let whole = frame(true, 1, b"split frame");
    client.write_all(&whole[..8]).await.unwrap();
    assert!(nothing_yet(&mut stream).await);
    assert!(stream.get_ref().at_boundary());
    assert_eq!(&stream.get_ref().pending[..], &whole[..8]);
    client.write_all(&whole[8..]).await.unwrap();
    assert_eq!(text(&mut stream).await, "split frame");
    assert!(stream.get_ref().at_boundary());

    // A long one is given to tungstenite as it comes: under way.
    let long = frame(true, 1, "y".repeat(20_000).as_bytes());
    client.write_all(&long[..12_000]).await.unwrap();
    assert!(nothing_yet(&mut stream).await);
    assert!(!stream.get_ref().at_boundary(), "a long frame read in part");
    client.write_all(&long[12_000..]).await.unwrap();
    assert_eq!(text(&mut stream).await.len(), 20_000);
    assert!(stream.get_ref().at_boundary());

    // A message in two fragments, a ping between them.
    client.write_all(&frame(false, 1, b"frag")).await.unwrap();
    client.write_all(&frame(true, 9, b"ping")).await.unwrap();
    match timeout(Duration::from_secs(5), stream.next()).await {
        Ok(Some(Ok(Message::Ping(payload)))) => assert_eq!(&payload[..], b"ping"),
        other => panic!("expected the ping, got {other:?}"),
    }
    assert!(!stream.get_ref().at_boundary(), "a message under way");
    client.write_all(&frame(true, 0, b"ments")).await.unwrap();
    assert_eq!(text(&mut stream).await, "fragments");
    assert!(stream.get_ref().at_boundary());
}

#[tokio::test]
async fn a_large_message_crosses_the_gate_in_pieces() {
    let (mut stream, mut client) = pair().await;
    let body = "x".repeat(100_000);
    let mut wire = frame(true, 1, body.as_bytes());
    wire.extend(frame(true, 1, b"after"));
    client.write_all(&wire).await.unwrap();
    assert_eq!(text(&mut stream).await, body);
    assert_eq!(text(&mut stream).await, "after");
    assert!(stream.get_ref().at_boundary());
}

#[tokio::test]
async fn a_client_gone_mid_header_ends_the_stream() {
    let (mut stream, mut client) = pair().await;
    client
        .write_all(&frame(true, 1, b"hello")[..1])
        .await
        .unwrap();
    drop(client);
    match timeout(Duration::from_secs(5), stream.next()).await {
        Ok(Some(Err(_)) | None) => {}
        other => panic!("expected the end, got {other:?}"),
    }
}

fn upgrade_headers(version: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONNECTION,
        HeaderValue::from_static("keep-alive, Upgrade"),
    );
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_str(version).unwrap(),
    );
    headers.insert(
        header::SEC_WEBSOCKET_KEY,
        HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
    );
    headers
}

#[test]
fn an_upgrade_request_is_checked_and_each_fault_named() {
    // RFC 6455's own example.
    assert_eq!(
        check_upgrade(&Method::GET, &upgrade_headers("13")).unwrap(),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
    let refused =
        |method: Method, headers: HeaderMap| check_upgrade(&method, &headers).unwrap_err();
    let (status, why) = refused(Method::POST, upgrade_headers("13"));
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(why.contains("GET, not POST"), "{why}");
    let (status, why) = refused(Method::GET, upgrade_headers("8"));
    assert_eq!(status, StatusCode::UPGRADE_REQUIRED);
    assert!(why.contains("version 13"), "{why}");
    for (name, missing) in [
        (header::CONNECTION, "Connection: upgrade"),
        (header::UPGRADE, "Upgrade: websocket"),
        (header::SEC_WEBSOCKET_KEY, "Sec-WebSocket-Key"),
    ] {
        let mut headers = upgrade_headers("13");
        headers.remove(name);
        let (status, why) = refused(Method::GET, headers);
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(why.contains(missing), "{why}");
    }
    let refusal = refusal(StatusCode::UPGRADE_REQUIRED, "v\n".into());
    assert_eq!(refusal.headers()[header::SEC_WEBSOCKET_VERSION], "13");
}

#[test]
#[should_panic(expected = "1 to 64 bytes")]
fn a_kind_must_be_named() {
    Sessions::new(None).route("", |_session| async {});
}
