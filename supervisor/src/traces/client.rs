//! The OTLP exporter's HTTP client: each batch is one HTTP/1.1 POST on a
//! connection of its own, driven by hyper's client on a runtime of the
//! exporter's thread.
//!
//! Why not the exporter's reqwest client: `otlp_endpoint` is always
//! `http://HOST:PORT` (the config refuses anything else), and reqwest's
//! connection pool, proxy and URL code, linked in, cost every master 250 to
//! 500 KiB of RSS even with no endpoint set (the `admin-idle` bench): the
//! pages of a binary's code are mapped in 64 KiB runs, so an idle master
//! holds most of its code, used or not. hyper's HTTP/1.1 client is little beside the server
//! the admin endpoint already runs.

use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, HOST};
use hyper_util::rt::TokioIo;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response, ResponseBodyTooLarge};
use std::time::Duration;

/// The largest collector answer read (the SDK's own clients' limit).
const MAX_RESPONSE: usize = 4 << 20;

/// Sends each request within `timeout`, connect to last byte of the answer.
#[derive(Debug)]
pub struct Client {
    timeout: Duration,
}

impl Client {
    /// A client whose every request gives up after `timeout`.
    pub fn new(timeout: Duration) -> Client {
        Client { timeout }
    }
}

#[async_trait::async_trait]
impl HttpClient for Client {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        // The SDK calls this on its exporter's thread, outside any tokio
        // runtime: one of its own for the request's socket and deadline,
        // made and dropped here so that it never outlives the call (nor is
        // dropped on the master's runtime).
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let timeout = self.timeout;
        runtime.block_on(async move {
            tokio::time::timeout(timeout, send(request))
                .await
                .map_err(|_| format!("no answer from the collector within {timeout:?}"))?
        })
    }
}

/// `request` on a new connection to its URI's host and port.
async fn send(request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
    let uri = request.uri();
    if uri.scheme_str() != Some("http") {
        return Err(format!("{uri}: only http:// endpoints are supported").into());
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{uri}: no host"))?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((authority.host(), port)).await?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // Drives the connection while the request is sent and answered; the
    // runtime is dropped after the answer, and the connection with it.
    tokio::spawn(connection);

    let (mut head, body) = request.into_parts();
    // A client connection sends the request target as given: the origin
    // form, with the host in its own header.
    head.uri = head
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()?;
    head.headers
        .insert(HOST, HeaderValue::from_str(authority.as_str())?);
    let response = sender
        .send_request(Request::from_parts(head, Full::new(body)))
        .await?;

    let (head, body) = response.into_parts();
    let body = match Limited::new(body, MAX_RESPONSE).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Box::new(ResponseBodyTooLarge::new()))
        }
        Err(e) => return Err(e),
    };
    Ok(Response::from_parts(head, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};

    /// One request read by a one-shot server, answered with `answer`.
    fn exchange(answer: &'static [u8]) -> (String, Result<Response<Bytes>, HttpError>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(n) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = n.trim().parse().unwrap();
                }
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            head.push_str(&String::from_utf8(body).unwrap());
            (&stream).write_all(answer).unwrap();
            head
        });
        let request = Request::post(format!("http://{address}/v1/traces"))
            .header("content-type", "application/x-protobuf")
            .body(Bytes::from_static(b"spans"))
            .unwrap();
        let client = Client::new(Duration::from_secs(5));
        let result = futures_executor::block_on(client.send_bytes(request));
        (server.join().unwrap(), result)
    }

    #[test]
    fn a_batch_is_posted_in_origin_form_with_its_host_and_length() {
        let (sent, answer) = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        assert!(sent.starts_with("POST /v1/traces HTTP/1.1\r\n"), "{sent}");
        let lower = sent.to_ascii_lowercase();
        assert!(lower.contains("\r\nhost: 127.0.0.1:"), "{sent}");
        assert!(lower.contains("\r\ncontent-length: 5\r\n"), "{sent}");
        assert!(
            lower.contains("\r\ncontent-type: application/x-protobuf\r\n"),
            "{sent}"
        );
        assert!(sent.ends_with("\r\n\r\nspans"), "{sent}");
        let answer = answer.unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.body().as_ref(), b"ok");
    }

    #[test]
    fn an_error_status_is_an_answer_not_a_failure() {
        let (_, answer) = exchange(b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(answer.unwrap().status(), 503);
    }

    #[test]
    fn a_collector_that_never_answers_times_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let request = Request::post(format!(
            "http://{}/v1/traces",
            listener.local_addr().unwrap()
        ))
        .body(Bytes::from_static(b"spans"))
        .unwrap();
        let client = Client::new(Duration::from_millis(100));
        let e = futures_executor::block_on(client.send_bytes(request)).unwrap_err();
        assert!(
            e.to_string()
                .contains("no answer from the collector within 100ms"),
            "{e}"
        );
    }

    #[test]
    fn an_https_endpoint_is_refused() {
        let request = Request::post("https://127.0.0.1:1/v1/traces")
            .body(Bytes::new())
            .unwrap();
        let e = futures_executor::block_on(Client::new(Duration::from_secs(1)).send_bytes(request))
            .unwrap_err();
        assert!(e.to_string().contains("only http:// endpoints"), "{e}");
    }
}
