//! modeld-fleet: the controller that places models across a fleet of modeld agents.
//!
//! Operators apply **deployments** (models with pinned digests, a selector, a wanted
//! state and a placement rule); agents dial out to the controller, say what they are
//! and what they hold, and receive their **assignments**. [`placement`] decides from
//! what devices report; [`controller`] keeps the state, persists it in sled and pushes
//! changes down each device's stream; [`api`] holds the two gRPC services.
//!
//! Modules import downward only: `serve` → `api` → `controller` → `placement`,
//! `deployment`, `rollout`, `sites` → `store` → `error`.

pub mod api;
pub mod controller;
pub mod deployment;
pub mod error;
pub mod placement;
pub mod rollout;
pub mod serve;
pub mod sites;
pub mod store;

pub use error::{Error, Result};
