//! Property tests of the control protocol: whatever line a client sends,
//! decoding never panics, and a request that is not right is an error that
//! names what is wrong.

use baton::control::protocol::{decode_request, encode_line, Request};
use proptest::prelude::*;

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (
            proptest::option::of("\\PC{0,8}"),
            proptest::option::of("\\PC{0,8}"),
            proptest::option::of("\\PC{0,8}")
        )
            .prop_map(|(canary, mode, if_version)| Request::Reload {
                canary,
                mode,
                if_version
            }),
        Just(Request::Promote {}),
        Just(Request::Rollback {}),
        Just(Request::Status {}),
        Just(Request::Upgrade {}),
        Just(Request::Reopen {}),
        any::<bool>().prop_map(|fast| Request::Stop { fast }),
        (any::<Option<i64>>(), any::<Option<i64>>()).prop_map(|(by, to)| Request::Scale { by, to }),
    ]
}

/// The error says which part of the request is wrong.
fn assert_names_what_is_wrong(error: &str) {
    assert!(
        error.starts_with("malformed request")
            || error.starts_with("unsupported control protocol version ")
            || error.starts_with("invalid request: "),
        "{error}"
    );
    if let Some(why) = error.strip_prefix("invalid request: ") {
        assert!(
            why.contains("\"command\"") || why.starts_with("command: ") || why.starts_with('`'),
            "{error}"
        );
    }
    if let Some(why) = error.strip_prefix("malformed request") {
        assert!(
            why.contains("not JSON") || why.contains("got ") || why.contains("\"v\""),
            "{error}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_request_round_trips(request in request()) {
        let line = encode_line(&request);
        prop_assert_eq!(decode_request(&line[..line.len() - 1]).unwrap(), request);
    }

    #[test]
    fn random_lines_are_errors_naming_what_is_wrong(line in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Err(e) = decode_request(&line) {
            assert_names_what_is_wrong(&e);
        }
    }

    #[test]
    fn damaged_requests_decode_or_say_what_is_wrong(
        request in request(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4),
    ) {
        let mut line = encode_line(&request);
        line.pop();
        for (at, byte, how) in &edits {
            if line.is_empty() {
                break;
            }
            let i = at.index(line.len());
            match how {
                0 => line[i] = *byte,
                1 => line.insert(i, *byte),
                _ => line.truncate(i),
            }
        }
        match decode_request(&line) {
            Ok(decoded) => {
                let again = encode_line(&decoded);
                prop_assert_eq!(decode_request(&again[..again.len() - 1]).unwrap(), decoded);
            }
            Err(e) => assert_names_what_is_wrong(&e),
        }
    }

    #[test]
    fn a_field_of_the_wrong_type_names_the_command(by in "\\PC{0,12}") {
        let line = serde_json::to_vec(&serde_json::json!({"v": 1, "command": "scale", "by": by})).unwrap();
        let error = decode_request(&line).unwrap_err();
        prop_assert!(error.starts_with("invalid request: `scale`: "), "{}", error);
    }
}
