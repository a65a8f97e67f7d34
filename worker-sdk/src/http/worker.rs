//! The common case in one call: [`Worker::serve`].

use super::{serve_tower, Accept, ResponseBody, ServeOptions, TowerService};
use crate::{Error, ListenerKind, Worker};
use std::sync::Arc;

impl Worker {
    /// Serves the tower `service` (an `axum::Router`, tonic's `Routes`, ...)
    /// over HTTP/1.1 and HTTP/2 on the TCP or Unix listener `name`: reports
    /// readiness, serves, reports open connections to the master, and on
    /// drain finishes as [`http::serve`](super::serve) describes. Returns
    /// once every connection is done.
    ///
    /// ```no_run
    /// # async fn run(app: axum::Router) -> Result<(), baton_worker::Error> {
    /// let mut worker = baton_worker::Worker::builder()
    ///     .listener("http", "127.0.0.1:8080")
    ///     .start()
    ///     .await?;
    /// worker.serve("http", app).await
    /// # }
    /// ```
    ///
    /// For anything else (TLS, a hyper service, other options) use the
    /// building blocks: [`tcp_listener`](Worker::tcp_listener),
    /// [`ready`](Worker::ready), [`serve_options`](Worker::serve_options) and
    /// [`http::serve`](super::serve) or [`http::serve_tower`](super::serve_tower).
    pub async fn serve<S, B>(&mut self, name: &str, service: S) -> Result<(), Error>
    where
        S: TowerService<B>,
        B: ResponseBody,
    {
        let options = self.serve_options();
        // Connections handed over are taken from before the master hears
        // the worker is ready.
        let announce = |listener: &dyn Fn() -> Option<String>| {
            if let (Some(handover), Some(address)) = (&options.handover, listener()) {
                handover.announce(&address);
            }
        };
        match self.listener_kind(name) {
            Some(ListenerKind::Unix) => {
                let listener = self.unix_listener(name)?;
                announce(&|| listener.handover_address());
                self.ready().await?;
                serve_tower(listener, service, self.drain(), options).await?;
            }
            _ => {
                let listener = self.tcp_listener(name)?;
                announce(&|| listener.handover_address());
                self.ready().await?;
                serve_tower(listener, service, self.drain(), options).await?;
            }
        }
        Ok(())
    }

    /// Default [`ServeOptions`] whose `on_connections` reports the open
    /// connections to the master (shown in `baton status`) and whose
    /// `handover` moves idle connections to the next generation at a
    /// reload (`[worker] handover`).
    ///
    /// ```no_run
    /// # async fn run(mut worker: baton_worker::Worker, app: axum::Router) -> Result<(), baton_worker::Error> {
    /// let listener = worker.tcp_listener("http")?;
    /// let options = worker.serve_options();
    /// worker.ready().await?;
    /// baton_worker::http::serve_tower(listener, app, worker.drain(), options).await?;
    /// # Ok(()) }
    /// ```
    pub fn serve_options(&self) -> ServeOptions {
        let control = self.reporter();
        ServeOptions {
            on_connections: Some(Arc::new(move |count| control.report_connections(count))),
            handover: self.handover(),
            ..ServeOptions::default()
        }
    }
}
