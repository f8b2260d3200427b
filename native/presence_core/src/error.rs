use std::fmt;

/// Every way a registry operation can be refused. Each variant maps to one
/// atom at the Erlang boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CoreError {
    /// The owner already has a presence under this topic and key.
    AlreadyTracked,
    /// The owner has no presence under this topic and key.
    NotTracked,
    /// The owner could not be watched because it is no longer alive.
    OwnerGone,
    /// The presence changed between reading it and writing it back.
    Stale,
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CoreError::AlreadyTracked => "already tracked",
            CoreError::NotTracked => "not tracked",
            CoreError::OwnerGone => "owner is not alive",
            CoreError::Stale => "presence changed concurrently",
        })
    }
}

impl std::error::Error for CoreError {}
