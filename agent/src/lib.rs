//! The edge's side agent as a library: label parsing, the Docker provider, health probes, the
//! snapshot link to the edge and the control socket. The `agent` and `edgectl` binaries are
//! thin front ends.
#![forbid(unsafe_code)]

pub mod acme;
pub mod ctl;
pub mod desired;
pub mod docker;
pub mod edge_link;
pub mod filter;
pub mod health;
pub mod labels;
pub mod model;
pub mod reconcile;
