//! Property tests of the worker wire protocol and the control channel:
//! whatever bytes arrive, decoding never panics, and a message that is not
//! right is an error that names what is wrong.

use baton_wire::channel::{pair, Channel, ChannelError};
use baton_wire::protocol::{
    decode, encode, AppFile, AppPhase, DecodeError, ListenerInfo, ListenerKind, MasterMessage,
    WorkerMessage, MAX_MESSAGE_SIZE, PROTOCOL_VERSION,
};
use proptest::prelude::*;
use std::os::fd::{AsRawFd, OwnedFd};

fn listener_info() -> impl Strategy<Value = ListenerInfo> {
    (
        "\\PC{0,64}",
        prop_oneof![
            Just(ListenerKind::Tcp),
            Just(ListenerKind::Unix),
            Just(ListenerKind::Udp)
        ],
        "\\PC{0,40}",
        any::<Option<u8>>(),
    )
        .prop_map(|(name, kind, address, quic_slot)| ListenerInfo {
            name,
            kind,
            address,
            quic_slot,
        })
}

fn master_message() -> impl Strategy<Value = MasterMessage> {
    prop_oneof![
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<bool>(),
            proptest::option::of("\\PC{0,60}"),
            any::<bool>()
        )
            .prop_map(
                |(
                    generation,
                    worker_index,
                    listener_count,
                    drain_timeout_ms,
                    app_config,
                    traceparent,
                    handover,
                )| {
                    MasterMessage::Hello {
                        generation,
                        worker_index,
                        listener_count,
                        drain_timeout_ms,
                        app_config,
                        traceparent,
                        handover,
                    }
                }
            ),
        (
            prop_oneof![Just(AppPhase::Initial), Just(AppPhase::Prepare)],
            "\\PC{0,16}",
            prop::collection::vec(("\\PC{0,16}", any::<u64>()), 0..4),
            proptest::option::of("\\PC{0,16}")
        )
            .prop_map(
                |(phase, version, files, log_filter)| MasterMessage::AppFiles {
                    phase,
                    version,
                    files: files
                        .into_iter()
                        .map(|(name, len)| AppFile { name, len })
                        .collect(),
                    log_filter,
                }
            ),
        "\\PC{0,16}".prop_map(|version| MasterMessage::AppCommit { version }),
        "\\PC{0,16}".prop_map(|version| MasterMessage::AppAbort { version }),
        (any::<u32>(), prop::collection::vec(listener_info(), 0..8))
            .prop_map(|(offset, listeners)| MasterMessage::Listeners { offset, listeners }),
        Just(MasterMessage::Reopen {}),
        any::<u64>().prop_map(|deadline_ms| MasterMessage::Drain { deadline_ms }),
    ]
}

fn worker_message() -> impl Strategy<Value = WorkerMessage> {
    prop_oneof![
        Just(WorkerMessage::Ready),
        any::<u64>().prop_map(|count| WorkerMessage::Connections { count }),
        "\\PC{0,200}".prop_map(|message| WorkerMessage::Error { message }),
        "\\PC{0,16}".prop_map(|version| WorkerMessage::AppRegistered { version }),
        "\\PC{0,16}".prop_map(|version| WorkerMessage::AppPrepared { version }),
        ("\\PC{0,16}", "\\PC{0,64}")
            .prop_map(|(version, reason)| WorkerMessage::AppRefused { version, reason }),
        "\\PC{0,16}".prop_map(|version| WorkerMessage::AppCommitted { version }),
    ]
}

/// Ways to damage an encoded message.
#[derive(Debug, Clone)]
enum Mutation {
    Truncate(prop::sample::Index),
    Flip(prop::sample::Index, u8),
    Insert(prop::sample::Index, u8),
    Remove(prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        (any::<prop::sample::Index>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<prop::sample::Index>().prop_map(Mutation::Remove),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if bytes.is_empty() {
            break;
        }
        match m {
            Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
            Mutation::Flip(i, x) => {
                let i = i.index(bytes.len());
                bytes[i] ^= x;
            }
            Mutation::Insert(i, b) => {
                let i = i.index(bytes.len() + 1);
                bytes.insert(i, *b);
            }
            Mutation::Remove(i) => {
                let i = i.index(bytes.len());
                bytes.remove(i);
            }
        }
    }
    bytes
}

/// The error says which part of the message is wrong.
fn assert_names_what_is_wrong(bytes: &[u8], error: &DecodeError) {
    let text = error.to_string();
    match error {
        DecodeError::TooLarge(n) => assert_eq!(*n, bytes.len()),
        DecodeError::NotAMessage(why) => assert!(
            why == "empty message"
                || (why.starts_with("not JSON: ") && why.contains("line"))
                || why.starts_with("expected a JSON object, got ")
                || why.contains("`v`"),
            "{text}"
        ),
        DecodeError::Version { peer } => {
            assert_ne!(*peer, PROTOCOL_VERSION);
            assert!(text.contains(&format!("version {peer}")), "{text}");
        }
        DecodeError::Invalid(why) => assert!(
            why.contains("`type`")
                || why.starts_with("message type: ")
                || why.contains(" message: "),
            "{text}"
        ),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_message_round_trips(master in master_message(), worker in worker_message()) {
        prop_assert_eq!(decode::<MasterMessage>(&encode(&master)).unwrap(), master);
        prop_assert_eq!(decode::<WorkerMessage>(&encode(&worker)).unwrap(), worker);
    }

    #[test]
    fn random_bytes_are_an_error_naming_what_is_wrong(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        for result in [
            decode::<MasterMessage>(&bytes).map(|_| ()),
            decode::<WorkerMessage>(&bytes).map(|_| ()),
        ] {
            if let Err(e) = result {
                assert_names_what_is_wrong(&bytes, &e);
            }
        }
    }

    #[test]
    fn damaged_messages_decode_or_say_what_is_wrong(
        master in master_message(),
        worker in worker_message(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let damaged = mutate(encode(&master), &mutations);
        match decode::<MasterMessage>(&damaged) {
            // A damage that still decodes is a message like any other.
            Ok(message) => prop_assert_eq!(decode::<MasterMessage>(&encode(&message)).unwrap(), message),
            Err(e) => assert_names_what_is_wrong(&damaged, &e),
        }
        let damaged = mutate(encode(&worker), &mutations);
        match decode::<WorkerMessage>(&damaged) {
            Ok(message) => prop_assert_eq!(decode::<WorkerMessage>(&encode(&message)).unwrap(), message),
            Err(e) => assert_names_what_is_wrong(&damaged, &e),
        }
    }

    #[test]
    fn a_field_of_the_wrong_type_names_the_message(count in "\\PC{0,20}") {
        let bytes = serde_json::to_vec(&serde_json::json!({
            "v": PROTOCOL_VERSION, "type": "connections", "count": count,
        })).unwrap();
        let error = decode::<WorkerMessage>(&bytes).unwrap_err().to_string();
        prop_assert!(error.contains("`connections` message"), "{}", error);
    }

    #[test]
    fn any_other_version_is_named(v in any::<u32>().prop_filter("another version", |v| *v != PROTOCOL_VERSION)) {
        let bytes = format!(r#"{{"v":{v},"type":"ready"}}"#);
        prop_assert_eq!(decode::<WorkerMessage>(bytes.as_bytes()), Err(DecodeError::Version { peer: v }));
    }

    #[test]
    fn whatever_datagram_arrives_the_channel_reports_it(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        oversized in any::<bool>(),
        fd_count in 0usize..4,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
        runtime.block_on(async {
            let (ours, theirs) = pair().unwrap();
            let channel = Channel::new(ours).unwrap();
            let bytes = if oversized { vec![b'{'; MAX_MESSAGE_SIZE + 1] } else { bytes };
            let files: Vec<OwnedFd> = (0..fd_count)
                .map(|_| std::fs::File::open("/dev/null").unwrap().into())
                .collect();
            let raw: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
            let rights = [nix::sys::socket::ControlMessage::ScmRights(&raw)];
            let cmsgs: &[_] = if raw.is_empty() { &[] } else { &rights };
            nix::sys::socket::sendmsg::<()>(
                theirs.as_raw_fd(),
                &[std::io::IoSlice::new(&bytes)],
                cmsgs,
                nix::sys::socket::MsgFlags::empty(),
                None,
            )
            .unwrap();
            match channel.try_recv::<WorkerMessage>() {
                Ok(Some(received)) => {
                    prop_assert_eq!(received.fds.len(), fd_count);
                    prop_assert_eq!(decode::<WorkerMessage>(&bytes).ok(), Some(received.message));
                }
                Ok(None) => prop_assert!(false, "a datagram from a live peer is not the end of the channel"),
                Err(ChannelError::MessageTruncated) => prop_assert!(bytes.len() > MAX_MESSAGE_SIZE),
                Err(ChannelError::Decode(e)) => assert_names_what_is_wrong(&bytes, &e),
                Err(e) => prop_assert!(false, "unexpected error: {}", e),
            }
            Ok(())
        })?;
    }
}

#[test]
fn an_empty_datagram_is_an_error_and_a_closed_peer_the_end() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (ours, theirs) = pair().unwrap();
        let channel = Channel::new(ours).unwrap();
        nix::sys::socket::send(theirs.as_raw_fd(), &[], nix::sys::socket::MsgFlags::empty())
            .unwrap();
        let error = channel.try_recv::<WorkerMessage>().unwrap_err();
        assert!(error.to_string().contains("empty message"), "{error}");
        drop(theirs);
        assert!(channel.recv::<WorkerMessage>().await.unwrap().is_none());
    });
}
