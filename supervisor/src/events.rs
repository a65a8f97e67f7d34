//! `GET /events` on the admin endpoint: every key log event (one with an
//! `event` field: reloads and their phases, rollbacks, probation, crash
//! loops, worker exits, adoptions, ...) as Server-Sent Events, in the same
//! JSON as the log's `log_format = "json"` lines.
//!
//! The log's subscriber has a layer of its own for them, writing each one
//! to a broadcast channel ([`Writer`]). Each `/events` reader gets a
//! receiver, read by a task that hands the lines on to the reader's
//! connection through a small queue: a slow or stuck reader fills its
//! queue, then falls behind the broadcast channel, which never waits for
//! it (the master never does); past [`BACKLOG`] events behind, the reader
//! gets a last `lagged` event and is dropped.

use http_body_util::BodyExt;
use hyper::body::{Bytes, Frame};
use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use tokio::sync::{broadcast, mpsc};

/// Events a reader may fall behind by before it is dropped.
pub const BACKLOG: usize = 1024;

/// Events a reader's connection holds before its task waits.
const QUEUE: usize = 64;

fn channel() -> &'static broadcast::Sender<Arc<str>> {
    static CHANNEL: OnceLock<broadcast::Sender<Arc<str>>> = OnceLock::new();
    CHANNEL.get_or_init(|| broadcast::channel(BACKLOG).0)
}

/// The log layer's writer: one JSON line each, sent to the readers (none
/// sent while there is no reader).
pub struct Writer;

/// One line being written.
pub struct Line(Vec<u8>);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Writer {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line(Vec::new())
    }
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if channel().receiver_count() > 0 {
            self.0.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.0);
        let text = text.trim_end();
        if !text.is_empty() {
            // No reader now: nothing to do.
            let _ = channel().send(text.into());
        }
    }
}

/// Whether the `/events` layer sees it: an event that names itself with
/// an `event` field, or a span (whose fields the events carry, as the
/// log's lines do).
pub fn is_key_event(metadata: &tracing::Metadata<'_>) -> bool {
    metadata.is_span() || metadata.fields().field("event").is_some()
}

/// An SSE message: `event: NAME` (the JSON's `fields.event`) and the line.
fn message(line: &str) -> Bytes {
    let name = serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v["fields"]["event"].as_str().map(str::to_string))
        .unwrap_or_else(|| "message".into());
    Bytes::from(format!("event: {name}\ndata: {line}\n\n"))
}

/// A new reader's response body: the events from now on, until the reader
/// goes or falls [`BACKLOG`] behind (then a last `lagged` event).
pub fn subscribe() -> Body {
    let mut events = channel().subscribe();
    let (queue, body) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        // Tells the reader at once that it is connected.
        if queue
            .send(Bytes::from_static(b": baton events\n\n"))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let bytes = match events.recv().await {
                Ok(line) => message(&line),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    let _ = queue
                        .send(Bytes::from(format!(
                            "event: lagged\ndata: {{\"lagged\":{missed}}}\n\n"
                        )))
                        .await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            // The reader is gone: its body (and queue) dropped.
            if queue.send(bytes).await.is_err() {
                return;
            }
        }
    });
    Body(body)
}

/// The streamed body of an `/events` response.
pub struct Body(mpsc::Receiver<Bytes>);

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

impl Body {
    /// As the admin endpoint's body type.
    pub fn boxed(self) -> http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible> {
        BodyExt::boxed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::MakeWriter;

    fn publish(line: &str) {
        let mut writer = Writer.make_writer();
        writer.write_all(line.as_bytes()).unwrap();
        writer.write_all(b"\n").unwrap();
    }

    /// The body's frames until it ends or `limit` came.
    async fn frames(body: &mut Body, limit: usize) -> Vec<String> {
        let mut out = Vec::new();
        while out.len() < limit {
            let next = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                std::future::poll_fn(|cx| hyper::body::Body::poll_frame(Pin::new(&mut *body), cx)),
            )
            .await
            .expect("a frame or the end within 2 s");
            match next {
                Some(Ok(frame)) => {
                    out.push(String::from_utf8_lossy(&frame.into_data().unwrap()).into_owned())
                }
                None => break,
                Some(Err(never)) => match never {},
            }
        }
        out
    }

    #[tokio::test]
    async fn a_reader_gets_each_event_then_a_stuck_one_is_dropped_lagged() {
        let mut body = subscribe();
        publish(r#"{"fields":{"event":"reload.started"}}"#);
        let got = frames(&mut body, 2).await;
        assert_eq!(got[0], ": baton events\n\n");
        assert!(
            got[1].starts_with("event: reload.started\ndata: {"),
            "{got:?}"
        );
        // Stuck: it reads nothing while far more than its backlog comes.
        for n in 0..(BACKLOG + QUEUE + 100) {
            publish(&format!(
                r#"{{"fields":{{"event":"worker.exited","n":{n}}}}}"#
            ));
        }
        tokio::task::yield_now().await;
        let got = frames(&mut body, BACKLOG * 4).await;
        let last = got.last().expect("frames");
        assert!(
            last.starts_with("event: lagged\ndata: {\"lagged\":"),
            "{last}"
        );
        assert!(
            got.len() <= QUEUE + 2,
            "dropped once behind, not after: {}",
            got.len()
        );
    }

    #[test]
    fn each_event_is_named_by_its_event_field() {
        let line = r#"{"level":"INFO","fields":{"message":"reload committed","event":"reload.committed"}}"#;
        assert_eq!(
            message(line),
            Bytes::from(format!("event: reload.committed\ndata: {line}\n\n"))
        );
        assert!(message("not json").starts_with(b"event: message\n"));
    }
}
