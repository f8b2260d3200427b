defmodule Drab.Presence.Sidecar.Writes do
  @moduledoc false
  # Local writes of a sidecar table, decided on the BEAM side (protocol
  # v3): the caller checks the write against the journal, makes its ref,
  # journals and counts it, and writes it to the port, without waiting for
  # the sidecar. A port round trip is what a write used to cost; now it
  # costs a few ETS operations and a pipe write.
  #
  # Every write of an owner's presences runs under a lock on that owner (a
  # row of the handle's locks table), so one owner's writes reach the pipe
  # in the order they were decided in, whichever processes make them, and
  # the sidecar applies them in that order. The lock is also how the port
  # owner knows no write is half done: before it replays a new sidecar, it
  # waits until no live process holds a lock (see PortOwner).
  #
  # A writer killed while it holds a lock (an untrappable exit between two
  # steps) leaves the lock behind, and may leave the owner's journal, its
  # counts and the sidecar disagreeing. The port owner finds such locks
  # (on its sweep, or when a writer asks), pauses writes, and resyncs the
  # owner and recounts (see PortOwner).
  alias Drab.Presence.Sidecar.{Handle, Wire}
  alias Drab.Presence.Table

  @track 16
  @untrack 17
  @update 19
  @exit 20

  # How long a writer waits for a restarting sidecar before giving up.
  @unavailable_ms 10_000

  @doc """
  Runs `fun` with the port, holding `owner`'s lock: every write of the
  owner's presences goes through here. Waits while the sidecar restarts.
  """
  @spec run(Handle.t(), non_neg_integer(), (port() -> result)) :: result when result: term()
  def run(%Handle{} = h, owner, fun),
    do: run(h, owner, fun, System.monotonic_time(:millisecond))

  defp run(h, owner, fun, since) do
    lock(h, owner, 0)

    case Handle.current(h) do
      {_epoch, port} when port != nil ->
        try do
          fun.(port)
        after
          :ets.delete_object(h.locks, {owner, self()})
        end

      {_epoch, nil} ->
        # Restarting (or paused for a repair): the port owner waits for
        # every lock to go before it replays; ours must not hold it up.
        :ets.delete_object(h.locks, {owner, self()})

        if System.monotonic_time(:millisecond) - since > @unavailable_ms do
          exit(
            {:sidecar_unavailable,
             "the presence sidecar did not come back in #{@unavailable_ms} ms"}
          )
        end

        Process.sleep(2)
        run(h, owner, fun, since)
    end
  end

  defp lock(h, owner, tries) do
    unless :ets.insert_new(h.locks, {owner, self()}) do
      case :ets.lookup(h.locks, owner) do
        [{_, holder}] when holder == self() ->
          raise ArgumentError, "a presence write of this owner is already in progress here"

        [{_, holder}] ->
          # Another writer of this owner; or a dead one, whose write the
          # port owner must repair before anyone writes this owner again.
          if rem(tries, 64) == 63 and not Process.alive?(holder),
            do: send(h.owner, :sweep_locks)

          if tries < 16, do: :erlang.yield(), else: Process.sleep(1)
          lock(h, owner, tries + 1)

        [] ->
          lock(h, owner, tries + 1)
      end
    end
  end

  @doc "A ref for a new presence (or a new meta): unique in this table, random across tables."
  @spec new_ref(Handle.t()) :: non_neg_integer()
  def new_ref(%Handle{refs: refs}) do
    Bitwise.band(:atomics.get(refs, 1) + :atomics.add_get(refs, 2, 1), 0xFFFF_FFFF_FFFF_FFFF)
  end

  @doc """
  Tracks `owner` (the id of `pid`). A pid that is no longer alive gets a
  ref and its presence leaves at once, as the NIF (and Phoenix) answer it.
  """
  @spec track(Handle.t(), pid(), binary(), binary(), binary()) ::
          {:ok, non_neg_integer()} | {:error, :already_tracked}
  def track(h, pid, topic, key, meta) do
    owner = Wire.pid_id(pid)

    run(h, owner, fn port ->
      row = {owner, topic, key}
      ref = new_ref(h)

      if :ets.insert_new(h.journal, {row, ref, meta, nil}) do
        count(h.counts, topic, key, 1)

        if :ets.update_counter(h.owners, owner, 1, {owner, 0}) == 1,
          do: send(Handle.monitor_for(h, owner), {:watch, owner})

        command(port, [<<@track, 0::64, 0::64, owner::64>>, Wire.str(topic), Wire.str(key)], [
          <<ref::64>>,
          meta
        ])

        # Its monitor may have seen it go before this row was in: the
        # presence goes now, as the NIF lets it.
        if pid != self() and not Process.alive?(pid), do: remove(h, port, row)
        {:ok, ref}
      else
        {:error, :already_tracked}
      end
    end)
  end

  @doc "Removes `owner`'s presence under `key` on `topic`, if any."
  @spec untrack(Handle.t(), non_neg_integer(), binary(), binary()) :: :ok
  def untrack(h, owner, topic, key) do
    run(h, owner, fn port -> remove(h, port, {owner, topic, key}) end)
  end

  defp remove(h, port, {owner, topic, key} = row) do
    case :ets.take(h.journal, row) do
      [{_, ref, meta, _prev}] ->
        uncount(h.counts, topic, key, 1)
        :ets.insert(h.leaves, {ref, topic, key, meta})
        release(h, owner, 1)

        command(port, [<<@untrack, 0::64, 0::64, owner::64>>, Wire.str(topic), Wire.str(key)], [
          <<ref::64>>
        ])

      [] ->
        :ok
    end

    :ok
  end

  @doc """
  Gives a presence a new meta and ref; with `expected_ref`, only if it
  still has that ref. The same meta changes nothing and keeps the ref.
  """
  @spec update(Handle.t(), non_neg_integer(), binary(), binary(), binary(), non_neg_integer() | nil) ::
          {:ok, non_neg_integer()} | {:error, :not_tracked | :stale}
  def update(h, owner, topic, key, meta, expected_ref) do
    run(h, owner, fn port ->
      row = {owner, topic, key}

      case :ets.lookup(h.journal, row) do
        [] ->
          {:error, :not_tracked}

        [{_, ref, _, _}] when expected_ref != nil and ref != expected_ref ->
          {:error, :stale}

        [{_, ref, ^meta, _}] ->
          {:ok, ref}

        [{_, old_ref, old_meta, _}] ->
          ref = new_ref(h)
          :ets.insert(h.journal, {row, ref, meta, old_ref})
          :ets.insert(h.leaves, {old_ref, topic, key, old_meta})

          command(port, [<<@update, 0::64, 0::64, owner::64>>, Wire.str(topic), Wire.str(key)], [
            <<old_ref::64, ref::64>>,
            meta
          ])

          {:ok, ref}
      end
    end)
  end

  @doc """
  Every presence of `owner` goes: its process exited (told by its
  monitor). Returns how many went.
  """
  @spec exit_owner(Handle.t(), non_neg_integer()) :: non_neg_integer()
  def exit_owner(h, owner) do
    run(h, owner, fn port ->
      refs = drop_rows(h, owner)
      :ets.delete(h.owners, owner)

      command(
        port,
        <<@exit, 0::64, 0::64, owner::64, length(refs)::32>>,
        for(r <- refs, do: <<r::64>>)
      )

      length(refs)
    end)
  end

  @doc false
  # The owner's journal rows go, uncounted, their leaves owed; their refs.
  # For the holder of the owner's lock, or a port owner that paused writes.
  @spec drop_rows(Handle.t(), non_neg_integer()) :: [non_neg_integer()]
  def drop_rows(h, owner) do
    for {{_, topic, key} = row, ref, meta, _prev} <- owner_rows(h, owner) do
      :ets.delete(h.journal, row)
      uncount(h.counts, topic, key, 1)
      :ets.insert(h.leaves, {ref, topic, key, meta})
      ref
    end
  end

  @doc "The journal rows of `owner` (its rows are one range of the ordered set)."
  @spec owner_rows(Handle.t(), non_neg_integer()) :: [tuple()]
  def owner_rows(h, owner),
    do: :ets.select(h.journal, [{{{owner, :_, :_}, :_, :_, :_}, [], [:"$_"]}])

  # The owner's last presence went: its monitor may let it go, unless a
  # track came meanwhile (the monitor checks the count again).
  defp release(h, owner, n) do
    if :ets.update_counter(h.owners, owner, -n, {owner, 0}) <= 0,
      do: send(Handle.monitor_for(h, owner), {:unwatch, owner})
  end

  # A closed port (the sidecar died) takes nothing from the journal: the
  # port owner replays it into the next sidecar once no lock is held.
  defp command(port, head, tail) do
    Port.command(port, [head | tail])
  rescue
    ArgumentError -> true
  end

  @doc """
  Counts `n` presences more under `key` on `topic`. Users are the strings
  keys are listed under: `42` and `"42"` are two presences of one user (a
  non-binary key is stored tagged with its string, see presence_core's
  key.rs). Rows at zero go, without losing a count written meanwhile.
  """
  @spec count(atom(), binary(), binary(), integer()) :: :ok
  def count(counts, topic, key, n) do
    listed = {topic, Table.listed_key(key)}
    now = :ets.update_counter(counts, listed, n, {listed, 0})

    users =
      cond do
        now <= 0 and now - n > 0 -> -1
        now > 0 and now - n <= 0 -> 1
        true -> 0
      end

    if now <= 0, do: :ets.select_delete(counts, [{{listed, 0}, [], [true]}])

    case :ets.update_counter(counts, topic, [{2, users}, {3, n}], {topic, 0, 0}) do
      [_, connections] when connections <= 0 ->
        :ets.select_delete(counts, [{{topic, :_, 0}, [], [true]}])
        :ok

      _ ->
        :ok
    end
  end

  @doc "`count/4` the other way."
  @spec uncount(atom(), binary(), binary(), integer()) :: :ok
  def uncount(counts, topic, key, n), do: count(counts, topic, key, -n)
end
