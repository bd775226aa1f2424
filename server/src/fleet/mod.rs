//! The agent's side of a fleet: it dials out to the controller (`--fleet`), introduces
//! itself, streams reports of its models, and hands the assignments it receives to the
//! node's reconciler ([`modeld_node::fleet`]), keeping them in the store so that a
//! restart, or a controller that is away, changes nothing.

pub mod convert;
pub mod link;
