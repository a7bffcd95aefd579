//! HTTP/1.1 towards clients and backends.

pub mod body;
pub mod chunked;
mod conn;
pub mod head;

pub use conn::serve;
