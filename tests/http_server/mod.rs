//! A test server: an axum app on an ephemeral port of 127.0.0.1, stopped gracefully. Shared by
//! the HTTP layer's and the client layer's tests.

use std::net::SocketAddr;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A server on an ephemeral port of 127.0.0.1, stopped gracefully by [`Server::stop`].
pub struct Server {
    pub addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// Serves `app` until [`Server::stop`].
pub async fn serve(app: Router) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("bound address");
    let (shutdown, signal) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = signal.await;
            })
            .await
            .expect("the server runs");
    });
    Server {
        addr,
        shutdown,
        task,
    }
}

impl Server {
    /// Stops accepting, waits for every connection to close, and drops the app (and its store).
    pub async fn stop(self) {
        let _ = self.shutdown.send(());
        self.task.await.expect("the server stops cleanly");
    }
}
