//! End-to-end tests that run the edge and agent processes together, with Docker, pebble and
//! network namespaces. The edge's own process-level tests live in `edge/tests/`.
#![forbid(unsafe_code)]
