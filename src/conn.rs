//! Serving TCP connections on threads, as the disk protocols (NBD, iSCSI) do: a tokio accept loop that
//! hands every connection to a thread of its own, with a check that runs once a second beside it (the
//! rooms close connections whose node left its slot there).

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Accepts on `listener` until an accepted socket cannot be taken over (the task is dropped otherwise);
/// `handle` runs on a new thread named `<room>-conn` for each connection, `every_second` beside the loop.
pub async fn accept_on_threads<H, C>(
    listener: &tokio::net::TcpListener,
    room: &'static str,
    every_second: C,
    handle: H,
) -> anyhow::Result<()>
where
    H: Fn(TcpStream, SocketAddr) + Send + Sync + Clone + 'static,
    C: Fn() + Send + 'static,
{
    let watcher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            every_second();
        }
    });
    let result = loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(room, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => break Err(e.into()),
        };
        let handle = handle.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{room}-conn"))
            .spawn(move || handle(stream, peer));
        if let Err(e) = spawned {
            tracing::error!(room, error = %e, "cannot start a connection thread");
        }
    };
    watcher.abort();
    result
}

/// Logs how a connection ended: a clean end of stream says nothing.
pub fn log_end(room: &'static str, peer: SocketAddr, result: std::io::Result<()>) {
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => tracing::debug!(room, %peer, error = %e, "connection ended"),
    }
}
