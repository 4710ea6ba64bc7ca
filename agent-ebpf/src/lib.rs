//! Empty library target: lets the workspace resolve this crate on the host. The programs are
//! in the `drain-agent` binary target, built for `bpfel-unknown-none` by agent/build.rs.
#![no_std]
