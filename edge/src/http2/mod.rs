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
