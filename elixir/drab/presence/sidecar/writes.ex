defmodule Drab.Presence.Sidecar.Writes do
  @moduledoc false
  # Local writes of a sidecar table, decided on the BEAM side (protocol
  # v3): the caller checks the write against the journal, makes its ref,
  # journals and counts it, and writes it to the port, without waiting for
  # the sidecar. A port round trip is what a write used to cost; now it
  # costs a few ETS operations and a pipe write.
  #
  # Every write of an owner's presences runs under a lock on that owner (a
  # row of its `locks` ETS table), so one owner's writes reach the pipe
  # in the order they were decided in, whichever processes make them, and
  # the sidecar applies them in that order (the port runs the commands of
  # all processes in the order they were made: a process's Port.command/2
  # returns once its command is queued behind any earlier one, and the
  # lock is let go only after). The lock is also how the port
  # owner knows no write is half done: before it replays a new sidecar, it
  # waits until no live process holds a lock (see Recovery).
  #
  # A writer killed while it holds a lock (an untrappable exit between two
  # steps) leaves the lock behind, and may leave the owner's journal, its
  # counts and the sidecar disagreeing. The port owner finds such locks
  # (on its sweep, or when a writer asks), pauses writes, and resyncs the
  # owner and recounts (see Recovery).
  #
  # Why this side decides writes that presence_core's Topic decides again
  # in the sidecar: a caller must never wait for the sidecar (a restart
  # takes a while), so already_tracked, not_tracked, stale, the new ref and
  # the counts are answered here, from the journal, which must hold every
  # local presence anyway to replay a new sidecar (DESIGN.md, "Writes,
  # crashes, and where the replay state lives"). The sidecar applies what
  # was decided; the key format both sides count by is Drab.Presence.Key
  # here and key.rs there.
  alias Drab.Presence.Key
  alias Drab.Presence.Sidecar.{Table, Wire}

  # How long a writer waits for a restarting sidecar before giving up.
  @unavailable_ms 10_000

  @doc """
  Runs `fun` with the port, holding `owner`'s lock: every write of the
  owner's presences goes through here. Waits while the sidecar restarts.
  """
  @spec run(Table.t(), non_neg_integer(), (port() -> result)) :: result when result: term()
  def run(%Table{} = table, owner, fun),
    do: run(table, owner, fun, System.monotonic_time(:millisecond))

  defp run(table, owner, fun, since) do
    lock(table, owner, since, 0)

    case Table.current(table) do
      {_epoch, port} when port != nil ->
        try do
          fun.(port)
        after
          :ets.delete_object(table.locks, {owner, self()})
        end

      {_epoch, nil} ->
        # Restarting (or paused for a repair): the port owner waits for
        # every lock to go before it replays; ours must not hold it up.
        :ets.delete_object(table.locks, {owner, self()})
        await_port(since)
        run(table, owner, fun, since)
    end
  end

  defp await_port(since) do
    if System.monotonic_time(:millisecond) - since > @unavailable_ms do
      exit(
        {:sidecar_unavailable, "the presence sidecar did not come back in #{@unavailable_ms} ms"}
      )
    end

    Process.sleep(2)
  end

  defp lock(table, owner, since, tries) do
    unless :ets.insert_new(table.locks, {owner, self()}) do
      if System.monotonic_time(:millisecond) - since > @unavailable_ms do
        exit(
          {:sidecar_unavailable,
           "a presence write of this owner held its lock #{@unavailable_ms} ms"}
        )
      end

      case :ets.lookup(table.locks, owner) do
        [{_, holder}] when holder == self() ->
          raise ArgumentError, "a presence write of this owner is already in progress here"

        [{_, holder}] ->
          # Another writer of this owner; or a dead one, whose write the
          # port owner must repair before anyone writes this owner again.
          if rem(tries, 64) == 63 and not Process.alive?(holder),
            do: notify(table.port_owner, :sweep_locks)

          if tries < 16, do: :erlang.yield(), else: Process.sleep(1)
          lock(table, owner, since, tries + 1)

        [] ->
          lock(table, owner, since, tries + 1)
      end
    end
  end

  @doc "A ref for a new presence (or a new meta): unique in this table, random across tables."
  @spec new_ref(Table.t()) :: non_neg_integer()
  def new_ref(%Table{ref_seed: seed, refs: refs} = table) do
    # Never 0: the core stores a previous ref in 8 bytes, 0 meaning none.
    case Bitwise.band(seed + :atomics.add_get(refs, 1, 1), 0xFFFF_FFFF_FFFF_FFFF) do
      0 -> new_ref(table)
      ref -> ref
    end
  end

  @doc """
  Tracks `owner` (the id of `pid`). A pid that is no longer alive gets a
  ref and its presence leaves at once, as the NIF (and Phoenix) answer it.
  """
  @spec track(Table.t(), pid(), binary(), binary(), binary()) ::
          {:ok, non_neg_integer()} | {:error, :already_tracked}
  def track(table, pid, topic, key, meta) do
    owner = Wire.pid_id(pid)

    run(table, owner, fn port ->
      row = {owner, topic, key}
      ref = new_ref(table)

      # The watch goes before anything is written: a writer killed after
      # it leaves a monitor on an owner that may have no presence (it is
      # dropped on DOWN); one killed before it has written nothing.
      unless has_presences?(table, owner),
        do: notify(Table.monitor_for(table, owner), {:watch, owner})

      if :ets.insert_new(table.journal, {row, ref, meta, nil}) do
        count(table.counts, topic, key, 1)

        command(port, Wire.track_frame(owner, topic, key, ref, meta))

        # Its monitor may have seen it go before this row was in: the
        # presence goes now, as the NIF lets it.
        if pid != self() and not Process.alive?(pid), do: remove(table, port, row)
        {:ok, ref}
      else
        {:error, :already_tracked}
      end
    end)
  end

  @doc "Removes `owner`'s presence under `key` on `topic`, if any."
  @spec untrack(Table.t(), non_neg_integer(), binary(), binary()) :: :ok
  def untrack(table, owner, topic, key) do
    run(table, owner, fn port -> remove(table, port, {owner, topic, key}) end)
  end

  # The leave is owed before the row goes: a writer killed in between
  # leaves a presence that is replayed under a new ref with its old ref's
  # leave owed, never one that subscribers see and nobody owes a leave for.
  defp remove(table, port, {owner, topic, key} = row) do
    case :ets.lookup(table.journal, row) do
      [{_, ref, meta, _prev}] ->
        :ets.insert(table.leaves, {ref, topic, key, meta})
        :ets.delete(table.journal, row)
        uncount(table.counts, topic, key, 1)

        # Its monitor checks again, under the owner's lock, before letting
        # it go: a track may come in between.
        unless has_presences?(table, owner),
          do: notify(Table.monitor_for(table, owner), {:unwatch, owner})

        command(port, Wire.untrack_frame(owner, topic, key, ref))

      [] ->
        :ok
    end

    :ok
  end

  @doc """
  Gives a presence a new meta and ref; with `expected_ref`, only if it
  still has that ref. The same meta changes nothing and keeps the ref.
  """
  @spec update(Table.t(), non_neg_integer(), binary(), binary(), binary(), non_neg_integer() | nil) ::
          {:ok, non_neg_integer()} | {:error, :not_tracked | :stale}
  def update(table, owner, topic, key, meta, expected_ref) do
    run(table, owner, fn port ->
      row = {owner, topic, key}

      case :ets.lookup(table.journal, row) do
        [] ->
          {:error, :not_tracked}

        [{_, ref, _, _}] when expected_ref != nil and ref != expected_ref ->
          {:error, :stale}

        [{_, ref, ^meta, _}] ->
          {:ok, ref}

        [{_, old_ref, old_meta, _}] ->
          ref = new_ref(table)
          :ets.insert(table.leaves, {old_ref, topic, key, old_meta})
          :ets.insert(table.journal, {row, ref, meta, old_ref})

          command(port, Wire.update_frame(owner, topic, key, old_ref, ref, meta))

          {:ok, ref}
      end
    end)
  end

  @doc """
  Every presence of each of `owners` goes: their processes exited (told
  by their monitor). One frame tells the sidecar of them all, so a mass
  disconnect costs a pipe write per burst, not per owner; their locks are
  held until it is written. An owner whose lock another writer holds is
  done on its own afterwards, holding no other lock: a wait for a lock
  never holds others up.
  """
  @spec exit_owners(Table.t(), [non_neg_integer()]) :: :ok
  def exit_owners(%Table{} = table, owners),
    do: exit_owners(table, owners, System.monotonic_time(:millisecond))

  defp exit_owners(table, owners, since) do
    {locked, busy} = Enum.split_with(owners, &:ets.insert_new(table.locks, {&1, self()}))

    case Table.current(table) do
      {_epoch, port} when port != nil ->
        try do
          if locked != [],
            do: command(port, Wire.exit_frame(Enum.map(locked, &{&1, drop_rows(table, &1)})))
        after
          Enum.each(locked, &:ets.delete_object(table.locks, {&1, self()}))
        end

        Enum.each(busy, fn owner ->
          run(table, owner, fn port ->
            command(port, Wire.exit_frame([{owner, drop_rows(table, owner)}]))
          end)
        end)

      {_epoch, nil} ->
        Enum.each(locked, &:ets.delete_object(table.locks, {&1, self()}))
        await_port(since)
        exit_owners(table, owners, since)
    end
  end

  @doc false
  # The owner's journal rows go, uncounted, their leaves owed; their refs.
  # For the holder of the owner's lock, or a port owner that paused writes.
  @spec drop_rows(Table.t(), non_neg_integer()) :: [non_neg_integer()]
  def drop_rows(table, owner) do
    for {{_, topic, key} = row, ref, meta, _prev} <- owner_rows(table, owner) do
      :ets.delete(table.journal, row)
      uncount(table.counts, topic, key, 1)
      :ets.insert(table.leaves, {ref, topic, key, meta})
      ref
    end
  end

  @doc "The journal rows of `owner`: one range of the ordered set, walked from its start."
  @spec owner_rows(Table.t(), non_neg_integer()) :: [tuple()]
  # Topics are binaries, which sort after any number: {owner, 0, 0} comes
  # just before the owner's first row.
  def owner_rows(table, owner),
    do: rows_from(table.journal, owner, :ets.next(table.journal, {owner, 0, 0}))

  defp rows_from(journal, owner, {owner, _, _} = row),
    do: :ets.lookup(journal, row) ++ rows_from(journal, owner, :ets.next(journal, row))

  defp rows_from(_journal, _owner, _other), do: []

  @doc """
  Whether `owner` has a presence in the journal: its rows are one range of
  the ordered set, and topics (binaries) sort after any number, so the row
  after `{owner, 0, 0}` is its first if it has any.
  """
  @spec has_presences?(Table.t(), non_neg_integer()) :: boolean()
  def has_presences?(table, owner),
    do: match?({^owner, _, _}, :ets.next(table.journal, {owner, 0, 0}))

  @doc """
  Runs `fun` holding `owner`'s lock, whether or not the sidecar is up: for
  a monitor that must see the owner's presences with no write half way.
  """
  @spec locked(Table.t(), non_neg_integer(), (() -> result)) :: result when result: term()
  def locked(table, owner, fun) do
    lock(table, owner, System.monotonic_time(:millisecond), 0)

    try do
      fun.()
    after
      :ets.delete_object(table.locks, {owner, self()})
    end
  end

  @doc """
  Sends to a process of the table by name, if it is there: one restarting
  (a monitor, the port owner) must not make a write raise half way. A
  restarted monitor watches every owner of the journal.
  """
  @spec notify(atom(), term()) :: :ok
  def notify(name, message) do
    case Process.whereis(name) do
      nil ->
        :ok

      pid ->
        send(pid, message)
        :ok
    end
  end

  # A closed port (the sidecar died) takes nothing from the journal: the
  # port owner replays it into the next sidecar once no lock is held.
  defp command(port, frame) do
    Port.command(port, frame)
  rescue
    ArgumentError -> true
  end

  @doc """
  Counts `n` presences more under `key` on `topic`. Users are the strings
  keys are listed under: `42` and `"42"` are two presences of one user (a
  non-binary key is stored tagged with its string, see presence_core's
  key.rs and Drab.Presence.Key). Rows at zero go, without losing a count written meanwhile.
  """
  @spec count(atom(), binary(), binary(), integer()) :: :ok
  def count(counts, topic, key, n) do
    listed = {topic, Key.listed(key)}
    now = :ets.update_counter(counts, listed, n, {listed, 0})

    users =
      cond do
        now <= 0 and now - n > 0 -> -1
        now > 0 and now - n <= 0 -> 1
        true -> 0
      end

    # Only a row still at zero goes: one counted meanwhile stays.
    if now <= 0, do: :ets.delete_object(counts, {listed, 0})

    case :ets.update_counter(counts, topic, [{2, users}, {3, n}], {topic, 0, 0}) do
      [_, connections] when connections <= 0 ->
        :ets.delete_object(counts, {topic, 0, 0})
        :ok

      _ ->
        :ok
    end
  end

  @doc "`count/4` the other way."
  @spec uncount(atom(), binary(), binary(), integer()) :: :ok
  def uncount(counts, topic, key, n), do: count(counts, topic, key, -n)
end
