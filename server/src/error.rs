//! The edge's errors: the node's, and what only starting and serving can hit. Every
//! variant maps to a status in `api::status`.

/// Convenience alias for the edge.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Node(#[from] modeld_node::Error),

    /// Bad configuration; only reachable at start-up.
    #[error("configuration: {0}")]
    Config(String),

    /// The gRPC server itself failed (listener, transport, reflection).
    #[error("gRPC server: {0}")]
    Serve(String),

    /// The stream to the fleet controller failed; the agent dials again.
    #[error("fleet controller: {0}")]
    Fleet(String),
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Node(e.into())
    }
}
