defmodule Drab.Presence.Calls do
  @moduledoc false
  # The operations behind every presence module's functions. They run in the
  # caller and go straight to the backend: no GenServer on the read or write
  # path. Bad input raises ArgumentError here, before the table is touched.

  import Bitwise, only: [<<<: 2]

  alias Drab.Presence.{Key, Runtime}

  # How long an update function keeps retrying against concurrent writers
  # before `{:error, :contended}`, and how many tries go without a pause.
  @update_patience_ms 1_000
  @update_eager_tries 3

  @spec track(module(), pid(), term(), term(), map()) ::
          {:ok, binary()} | {:error, {:already_tracked, pid(), binary(), term()}}
  def track(module, pid, topic, key, meta) do
    check_pid!(pid)
    check_topic!(topic)
    check_meta!(meta)
    %Runtime{backend: backend, table: table} = Runtime.fetch!(module)

    case backend.track(table, pid, topic, Key.store!(key), without_refs(meta)) do
      {:ok, _phx_ref} = ok -> ok
      {:error, :already_tracked} -> {:error, {:already_tracked, pid, topic, key}}
      {:error, reason} -> refuse!(reason, pid, meta, module)
    end
  end

  @spec untrack(module(), pid(), term(), term()) :: :ok
  def untrack(module, pid, topic, key) do
    check_pid!(pid)
    check_topic!(topic)
    %Runtime{backend: backend, table: table} = Runtime.fetch!(module)
    backend.untrack(table, pid, topic, Key.store!(key))
  end

  @spec update(module(), pid(), term(), term(), map() | (map() -> map())) ::
          {:ok, binary()} | {:error, :nopresence | :contended}
  def update(module, pid, topic, key, meta_or_fun) do
    check_pid!(pid)
    check_topic!(topic)
    %Runtime{} = runtime = Runtime.fetch!(module)
    stored = Key.store!(key)

    case meta_or_fun do
      fun when is_function(fun, 1) ->
        deadline = System.monotonic_time(:millisecond) + @update_patience_ms
        update_with(runtime, module, pid, topic, {stored, key}, fun, {1, deadline})

      meta ->
        check_meta!(meta)
        write(runtime, module, pid, topic, stored, without_refs(meta), nil)
    end
  end

  # Read, apply, write back only if nobody updated in between; else retry.
  # Retries pause a little (random, growing) after the first few, so that
  # many updaters of one presence spread out instead of colliding again;
  # and they stop after a while, so that a slow function racing a frequent
  # writer gets a clear answer instead of retrying forever.
  defp update_with(%Runtime{} = runtime, module, pid, topic, keys, fun, {try, deadline}) do
    %Runtime{backend: backend, table: table} = runtime
    {stored, key} = keys

    case backend.lookup(table, pid, topic, stored) do
      {:error, :not_tracked} ->
        {:error, :nopresence}

      {:ok, {old_meta, phx_ref}} ->
        new_meta = apply_update!(fun, old_meta, key)

        case write(runtime, module, pid, topic, stored, new_meta, phx_ref) do
          {:error, :stale} ->
            if System.monotonic_time(:millisecond) >= deadline do
              {:error, :contended}
            else
              if try >= @update_eager_tries,
                do: Process.sleep(:rand.uniform(1 <<< min(try - @update_eager_tries, 5)))

              update_with(runtime, module, pid, topic, keys, fun, {try + 1, deadline})
            end

          result ->
            result
        end
    end
  end

  # The function sees the meta as Phoenix passes it, with its phx_ref. One
  # that raises, throws or exits leaves the presence as it was, and the
  # caller gets an ArgumentError saying so, whichever it did.
  defp apply_update!(fun, old_meta, key) do
    new_meta =
      try do
        fun.(old_meta)
      catch
        kind, reason ->
          reraise ArgumentError,
                  [
                    message:
                      "the update function for presence #{inspect(key)} " <>
                        failure(kind, reason, __STACKTRACE__) <> "; the presence is unchanged"
                  ],
                  __STACKTRACE__
      end

    check_meta!(new_meta)
    without_refs(new_meta)
  end

  defp failure(:error, reason, stacktrace) do
    exception = Exception.normalize(:error, reason, stacktrace)
    "raised #{inspect(exception.__struct__)}: #{Exception.message(exception)}"
  end

  defp failure(:throw, value, _stacktrace), do: "threw #{inspect(value)}"
  defp failure(:exit, reason, _stacktrace), do: "exited: #{Exception.format_exit(reason)}"

  # Phoenix sets these itself, over whatever the meta had. Stored, they would
  # make every `fn meta -> meta end` look like a change.
  defp without_refs(meta) when is_map_key(meta, :phx_ref) or is_map_key(meta, :phx_ref_prev),
    do: Map.drop(meta, [:phx_ref, :phx_ref_prev])

  defp without_refs(meta), do: meta

  defp write(%Runtime{backend: backend, table: table}, module, pid, topic, key, meta, expected_ref) do
    case backend.update(table, pid, topic, key, meta, expected_ref) do
      {:ok, _phx_ref} = ok -> ok
      {:error, :not_tracked} -> {:error, :nopresence}
      {:error, :stale} = stale -> stale
      {:error, reason} -> refuse!(reason, pid, meta, module)
    end
  end

  @spec list(module(), term()) :: map()
  def list(module, topic) do
    check_topic!(topic)
    %Runtime{backend: backend, table: table} = Runtime.fetch!(module)
    module.fetch(topic, backend.list(table, topic))
  end

  @spec get_by_key(module(), term(), term()) :: map() | []
  def get_by_key(module, topic, key) do
    check_topic!(topic)
    %Runtime{backend: backend, table: table} = Runtime.fetch!(module)
    stored = Key.store!(key)

    case backend.get_by_key(table, topic, stored) do
      [] ->
        []

      %{} = presences ->
        # Listed under its string, as Phoenix lists it: one entry.
        [{listed, _}] = Map.to_list(presences)
        %{^listed => fetched} = module.fetch(topic, presences)
        fetched
    end
  end

  @spec counts(module(), term()) :: {non_neg_integer(), non_neg_integer()}
  def counts(module, topic) do
    check_topic!(topic)
    %Runtime{backend: backend, table: table} = Runtime.fetch!(module)
    backend.counts(table, topic)
  end

  @spec stats(module()) :: %{atom() => non_neg_integer()}
  def stats(module) do
    %Runtime{backend: backend, table: table} = Runtime.fetch!(module)
    backend.stats(table)
  end

  @spec subscribe(module(), term()) :: :ok | {:error, term()}
  def subscribe(module, topic) do
    check_topic!(topic)
    Drab.Presence.Broadcast.subscribe(Runtime.fetch!(module).delivery, topic)
  end

  @spec unsubscribe(module(), term()) :: :ok
  def unsubscribe(module, topic) do
    check_topic!(topic)
    Drab.Presence.Broadcast.unsubscribe(Runtime.fetch!(module).delivery, topic)
  end

  defp check_pid!(pid) when is_pid(pid) and node(pid) == node(), do: :ok

  defp check_pid!(pid) when is_pid(pid) do
    raise ArgumentError,
          "cannot track #{inspect(pid)}: it lives on #{inspect(node(pid))}; track a process " <>
            "on the node it runs on"
  end

  defp check_pid!(other), do: raise(ArgumentError, "expected a pid, got: #{inspect(other)}")

  defp check_topic!(topic) when is_binary(topic), do: :ok

  defp check_topic!(topic),
    do: raise(ArgumentError, "a presence topic must be a binary, got: #{inspect(topic)}")

  defp check_meta!(meta) when is_map(meta), do: :ok

  defp check_meta!(meta),
    do: raise(ArgumentError, "a presence meta must be a map, got: #{inspect(meta)}")

  # The message measures neither the meta (encoding a 100 MB term to say
  # how large it is would cost what refusing it early saved) nor the table
  # (stats/0 walks every topic under the lock).
  defp refuse!(:meta_too_large, _pid, _meta, module) do
    raise ArgumentError,
          "presence meta is over the :max_meta_bytes limit of #{inspect(module)} " <>
            "(as term_to_binary/1 encodes it; stats/0 shows the limit); keep metas " <>
            "small (ids, timestamps) or raise the limit"
  end
end
