use presence_core::CoreError;
use rustler::{Atom, Encoder, Env, Term};

use crate::atoms::{already_tracked, meta_too_large, noproc, not_tracked, stale};

/// Every `{:error, reason}` a table NIF can return. The Elixir side lists
/// the same reasons in `Drab.Presence.Native.reason()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NifError {
    Core(CoreError),
    MetaTooLarge,
}

impl From<CoreError> for NifError {
    fn from(e: CoreError) -> Self {
        NifError::Core(e)
    }
}

impl NifError {
    pub fn reason(self) -> Atom {
        match self {
            NifError::Core(CoreError::AlreadyTracked) => already_tracked(),
            NifError::Core(CoreError::NotTracked) => not_tracked(),
            NifError::Core(CoreError::OwnerGone) => noproc(),
            NifError::Core(CoreError::Stale) => stale(),
            NifError::MetaTooLarge => meta_too_large(),
        }
    }
}

/// Encodes as the bare reason: rustler wraps a NIF's `Err(e)` in
/// `{:error, e}` and its `Ok(v)` in `{:ok, v}`.
impl Encoder for NifError {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        self.reason().encode(env)
    }
}
