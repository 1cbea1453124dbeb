//! The agent's HTTP listener: `/metrics` in the Prometheus text format, and
//! an index at `/`. A scrape asks the agent's loop for a fresh rendering
//! over a channel, so the state stays on the loop's thread and a scrape
//! always sees the latest records. Not here: what the metrics are
//! (`metrics`).

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::{mpsc, oneshot};

/// A scrape waiting for its text.
pub type Scrape = oneshot::Sender<String>;

/// Binds `addr` and serves until the runtime ends; scrapes arrive on the
/// returned channel.
pub async fn serve(addr: SocketAddr) -> std::io::Result<mpsc::Receiver<Scrape>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let (tx, rx) = mpsc::channel::<Scrape>(16);
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(index))
        .with_state(tx);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("memtrace agent: the metrics listener stopped: {e}");
        }
    });
    Ok(rx)
}

async fn metrics(State(tx): State<mpsc::Sender<Scrape>>) -> impl IntoResponse {
    let (reply, text) = oneshot::channel();
    if tx.send(reply).await.is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain")],
            String::from("memtrace agent is stopping\n"),
        );
    }
    match text.await {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain")],
            String::from("memtrace agent is stopping\n"),
        ),
    }
}

async fn index() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        "<html><body><h1>memtrace agent</h1><p><a href=\"/metrics\">/metrics</a></p></body></html>\n",
    )
}
