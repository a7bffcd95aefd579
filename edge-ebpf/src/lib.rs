//! XDP abuse filter and SO_REUSEPORT steering programs, and the map types shared with
//! userspace. Not implemented yet: the edge runs without a kernel filter.
#![no_std]
#![forbid(unsafe_code)]
