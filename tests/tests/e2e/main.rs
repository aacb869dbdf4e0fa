//! The end-to-end tests, one module per area, built as one test binary: one link and one
//! instantiation of the client and runtime code they share instead of one per area (a fresh
//! machine builds the suite minutes sooner). Tests of every area run side by side, two at a
//! time on two cores; each starts its own servers on ports of its own. One area:
//! `cargo test --release --workspace --test e2e tier2::` (`--workspace`: one package alone
//! resolves features differently and rebuilds the client).

mod bad_input;
mod cli;
mod client_api;
mod cluster;
mod corruption;
mod crash;
mod disk_full;
mod etcd_node;
mod hostile_peer;
mod reader_group;
mod request_fuzz;
mod retention;
mod scaling;
mod scaling_crash;
mod segments;
mod tier2;
mod txn;
mod unix_socket;
