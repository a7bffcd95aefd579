//! HTTP/2 towards clients (h2 over TLS), forwarded to the same HTTP/1.1 backend pools as
//! HTTP/1.1 requests.

mod conn;
pub mod guard;
mod stream;

pub use conn::serve;
