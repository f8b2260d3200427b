defmodule Drab.Presence.Backend do
  @moduledoc false
  # Where a presence table lives. The NIF backend keeps it in this VM; the
  # sidecar backend (next) keeps it in a port process. Callers talk to a
  # backend directly, with the handle from `new/1`: no process in between.

  @type handle :: term()
  @type topic :: binary()
  @type key :: binary()
  @type reason :: :already_tracked | :not_tracked | :noproc | :stale | :meta_too_large
  @type grouped :: %{optional(key) => %{metas: [map()]}}

  @callback new(keyword()) :: handle()
  @callback set_dispatcher(handle(), pid()) :: pending? :: boolean()
  @callback track(handle(), pid(), topic(), key(), map()) :: {:ok, binary()} | {:error, reason()}
  @callback untrack(handle(), pid(), topic(), key()) :: :ok
  @callback lookup(handle(), pid(), topic(), key()) ::
              {:ok, {map(), non_neg_integer()}} | {:error, :not_tracked}
  @callback update(handle(), pid(), topic(), key(), map(), non_neg_integer() | nil) ::
              {:ok, binary()} | {:error, reason()}
  @callback counts(handle(), topic()) ::
              {users :: non_neg_integer(), connections :: non_neg_integer()}
  @callback list(handle(), topic()) :: grouped()
  @callback get_by_key(handle(), topic(), key()) :: grouped() | []
  @callback take_diffs(handle(), pos_integer()) ::
              {[{topic(), joins :: grouped(), leaves :: grouped()}],
               still_pending :: non_neg_integer()}
  @callback stats(handle()) :: %{atom() => non_neg_integer()}
end
