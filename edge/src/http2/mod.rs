//! HTTP/2 towards clients (h2 over TLS), forwarded to the same HTTP/1.1 backend pools as
//! HTTP/1.1 requests, or over h2c to backends whose URL scheme is `h2c` (gRPC).

pub mod body;
pub mod client;
mod conn;
pub mod guard;
mod h2c;
pub(crate) mod stream;
mod to_http1;
mod websocket;

pub use conn::serve;
pub(crate) use h2c::{grpc_timeout, is_grpc, GRPC_DEADLINE_EXCEEDED};

/// Sends `data` on `stream` in pieces as flow-control capacity becomes available. `sleep` is the
/// caller's runtime timer (monoio's on the workers, tokio's on the QUIC threads). When no
/// capacity arrives within `idle`, the stream is reset with CANCEL.
pub(crate) async fn send_with_capacity<Sleep, Timer>(
    stream: &mut h2::SendStream<bytes::Bytes>,
    mut data: bytes::Bytes,
    idle: std::time::Duration,
    sleep: Sleep,
) -> Result<(), ()>
where
    Sleep: Fn(std::time::Duration) -> Timer,
    Timer: std::future::Future<Output = ()>,
{
    use std::task::Poll;

    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let mut timer = std::pin::pin!(sleep(idle));
        // `None` when the timer fired first.
        let polled = std::future::poll_fn(|cx| match stream.poll_capacity(cx) {
            Poll::Ready(capacity) => Poll::Ready(Some(capacity)),
            Poll::Pending => timer.as_mut().poll(cx).map(|()| None),
        })
        .await;
        let capacity = match polled {
            Some(Some(Ok(n))) => n,
            Some(Some(Err(_)) | None) => return Err(()),
            None => {
                stream.send_reset(h2::Reason::CANCEL);
                return Err(());
            }
        };
        if capacity == 0 {
            continue;
        }
        let piece = data.split_to(capacity.min(data.len()));
        if stream.send_data(piece, false).is_err() {
            return Err(());
        }
    }
    Ok(())
}
