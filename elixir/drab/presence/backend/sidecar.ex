defmodule Drab.Presence.Backend.Sidecar do
  @moduledoc false
  # The table in a sidecar OS process (native/presence_sidecar), behind a
  # port. Same calls, results and errors as Backend.NIF.
  #
  # Writes are decided on this side (see Writes): the caller checks them
  # against the BEAM-side journal, journals and counts them, and writes
  # them to the port without waiting for the sidecar. Other requests go
  # straight to the port, and the caller waits for the reply, which the
  # port owner routes back by request id: no process serialises callers.
  # Counts and lookups read ETS, without crossing the port. Listings
  # arrive in chunks.
  #
  # A caller whose sidecar died while it waited for a reply sends its
  # request again once a new sidecar has been replayed (see PortOwner).
  @behaviour Drab.Presence.Backend

  alias Drab.Presence.Options
  alias Drab.Presence.Sidecar.{Instance, Table, Wire, Writes}
  require Wire

  # How often a waiting caller checks that its sidecar is still the same.
  @recheck_ms 50
  # How long a caller waits for a restarting sidecar before giving up.
  @unavailable_ms 10_000

  @doc "The sidecar executable built by the mix compiler."
  @spec executable() :: Path.t()
  def executable do
    Path.join([:code.priv_dir(:drab_presence) |> List.to_string(), "native", "presence_sidecar"])
  end

  @impl true
  def new(module, opts) do
    max = Keyword.fetch!(opts, :max_meta_bytes)
    path = executable()

    File.exists?(path) ||
      raise ArgumentError,
            "the presence sidecar executable is missing (#{path}): compile drab_presence " <>
              "again (mix deps.compile drab_presence), which installs it from the release " <>
              "or builds it with cargo"

    Process.whereis(Drab.Presence.Application) ||
      raise ArgumentError,
            "backend: :sidecar needs the :drab_presence application started (its supervisor " <>
              "keeps the sidecar running)"

    table = Table.new(module, pool_size(), path)
    :ok = Table.configure(table, max, Options.diff_per_operation?(opts))

    spec = %{
      id: {Instance, table.id},
      start: {Instance, :start_link, [table, opts]},
      type: :supervisor
    }

    case Supervisor.start_child(Drab.Presence.Application, spec) do
      {:ok, _pid} ->
        table

      {:error, reason} ->
        Supervisor.delete_child(Drab.Presence.Application, {Instance, table.id})
        raise ArgumentError, "cannot start the presence sidecar: #{describe(reason)}"
    end
  end

  defp describe({:shutdown, {:failed_to_start_child, _child, message}}) when is_binary(message),
    do: message

  defp describe(reason), do: inspect(reason)

  # Enough processes that a mass disconnect's DOWNs spread over the
  # schedulers, few enough to stay a pool.
  defp pool_size, do: System.schedulers_online() |> max(2) |> min(16)

  @doc false
  # Stops a table's sidecar and its processes, for tests that make many.
  @spec close(Table.t()) :: :ok
  def close(%Table{} = table) do
    _ = Supervisor.terminate_child(Drab.Presence.Application, {Instance, table.id})
    _ = Supervisor.delete_child(Drab.Presence.Application, {Instance, table.id})
    Table.unpublish(table)
    :ok
  end

  @doc false
  # The OS pid of the running sidecar, for tests and benches that kill it.
  @spec os_pid(Table.t()) :: non_neg_integer() | nil
  def os_pid(%Table{} = table) do
    with {_, port} when port != nil <- Table.current(table),
         {:os_pid, os_pid} <- Port.info(port, :os_pid) do
      os_pid
    else
      # Restarting, or closed with a port owner killed and not restarted yet.
      _ -> nil
    end
  end

  @impl true
  def configure(%Table{} = table, opts) do
    max = Keyword.fetch!(opts, :max_meta_bytes)
    :ok = Table.configure(table, max, Options.diff_per_operation?(opts))
    {:ok, _} = call(table, :configure, Wire.configure_body(Table.settings(table)))
    :ok
  end

  @impl true
  def set_dispatcher(table, pid) when is_pid(pid) do
    {:ok, <<pending>>} = call(table, :set_dispatcher, <<Wire.pid_id(pid)::64>>)
    pending == 1
  end

  @impl true
  def track(table, pid, topic, key, meta) do
    with {:ok, encoded} <- encode_meta(table, meta),
         {:ok, ref} <- Writes.track(table, pid, topic, key, encoded) do
      {:ok, Wire.ref_string(ref)}
    end
  end

  @impl true
  def untrack(table, pid, topic, key), do: Writes.untrack(table, Wire.pid_id(pid), topic, key)

  @impl true
  def lookup(%Table{journal: journal}, pid, topic, key) do
    case :ets.lookup(journal, {Wire.pid_id(pid), topic, key}) do
      [{_, ref, meta, prev}] -> {:ok, {with_refs(:erlang.binary_to_term(meta), ref, prev), ref}}
      [] -> {:error, :not_tracked}
    end
  end

  # As the NIF gives it: the meta with its refs.
  defp with_refs(meta, ref, nil), do: Map.put(meta, :phx_ref, Wire.ref_string(ref))

  defp with_refs(meta, ref, prev),
    do: meta |> with_refs(ref, nil) |> Map.put(:phx_ref_prev, Wire.ref_string(prev))

  @impl true
  def update(table, pid, topic, key, meta, expected_ref) do
    with {:ok, encoded} <- encode_meta(table, meta),
         {:ok, ref} <- Writes.update(table, Wire.pid_id(pid), topic, key, encoded, expected_ref) do
      {:ok, Wire.ref_string(ref)}
    end
  end

  @impl true
  def counts(%Table{counts: counts}, topic) do
    case :ets.lookup(counts, topic) do
      [{_, users, connections}] -> {users, connections}
      [] -> {0, 0}
    end
  end

  @impl true
  def list(table, topic), do: listing(table, :list, Wire.str(topic))

  @impl true
  def get_by_key(table, topic, key),
    do: listing(table, :get_by_key, [Wire.str(topic), Wire.str(key)])

  @impl true
  def take_diffs(table, max_topics) do
    # The rest (this node's delta started pending, leaves delivered) is the
    # port owner's.
    {:ok, <<queued::64, pending::64, _rest::binary>>} = call(table, :take_diffs, <<max_topics::32>>)

    {queued, pending}
  end

  # The dispatcher reads a window's parts in one round trip and keeps
  # them in its process dictionary until it acknowledges them, one by one;
  # acknowledgements go without waiting for a reply. Writes queued in the
  # pipe ahead of the dispatcher's requests then hold it up once a window,
  # not once per part. A dispatcher that dies takes its copies with it: the
  # parts stay in the sidecar until acknowledged, and its successor reads
  # them again.
  @parts_per_read 64

  @impl true
  def next_part(%Table{id: id} = table) do
    case Process.get({__MODULE__, :parts, id}, []) do
      [part | _] ->
        decode_part(part)

      [] ->
        case call(table, :next_part, <<@parts_per_read::32>>) do
          {:ok, <<0::32>>} ->
            :none

          {:ok, <<_n::32, parts::binary>>} ->
            [first | _] = read = read_parts(parts, System.monotonic_time(:microsecond))
            Process.put({__MODULE__, :parts, id}, read)
            decode_part(first)
        end
    end
  end

  # Each part is decoded as it is handed out, not all at once: the
  # dispatcher broadcasts between two parts instead of decoding 256 KB in
  # one go. Its age is the sidecar's, plus the time it waited here.
  defp decode_part({id, topic, joins, leaves, age_us, read_at}) do
    age_us = age_us + System.monotonic_time(:microsecond) - read_at
    {id, topic, :erlang.binary_to_term(joins), :erlang.binary_to_term(leaves), age_us}
  end

  defp read_parts(<<>>, _read_at), do: []

  defp read_parts(
         <<id::64, age_us::64, tl::32, topic::binary-size(tl), jl::32, joins::binary-size(jl),
           ll::32, leaves::binary-size(ll), rest::binary>>,
         read_at
       ) do
    [{id, :binary.copy(topic), joins, leaves, age_us, read_at} | read_parts(rest, read_at)]
  end

  @impl true
  def ack_part(%Table{id: id} = table, part) do
    case Process.get({__MODULE__, :parts, id}, []) do
      [{^part, _, _, _, _, _} | rest] -> Process.put({__MODULE__, :parts, id}, rest)
      _ -> :ok
    end

    # The port owner reads the reply (the leaves now delivered). A sidecar
    # restarted meanwhile has parts of other ids: the ack changes nothing.
    {_epoch, port} = await_port(table, System.monotonic_time(:millisecond))

    try do
      Port.command(port, Wire.request(:ack_part, 0, 0, <<part::64>>))
    rescue
      ArgumentError -> true
    end

    :ok
  end

  @impl true
  def stats(table) do
    {:ok,
     <<presences::64, owners::64, topics::64, pending::64, queued::64, max::64, heap::64,
       replicas::64>>} = call(table, :stats, [])

    %{
      presences: presences,
      owners: owners,
      topics: topics,
      pending_topics: pending,
      queued_parts: queued,
      max_meta_bytes: max,
      nif_heap_bytes: heap,
      replicas: replicas
    }
  end

  ## Cluster mode (Drab.Presence.Cluster), as the NIF's. The sidecar
  ## records this node's deltas and applies other nodes'; what must outlive
  ## a sidecar (incarnation, last seq, replica ids) is kept on this side,
  ## in its `replication` ETS table, and the port owner hands it to a
  ## restarted sidecar. The sidecar cannot message the replicator: the port
  ## owner does, from take_diffs replies (see PortOwner and Journal).

  @impl true
  def set_replicator(%Table{replication: replication} = table, pid)
      when is_pid(pid) or pid == nil do
    :ets.insert(replication, {:replicator, pid})
    [{:seq, seq}] = :ets.lookup(replication, :seq)
    {:ok, _} = call(table, :set_replicator, <<if(pid, do: 1, else: 0), seq::64>>)
    [{:incarnation, incarnation}] = :ets.lookup(replication, :incarnation)
    incarnation
  end

  # Writes go unanswered, but any request does: the sidecar answers in
  # order, after the writes before it, and the port owner forwards the Wake
  # frames of those writes before the reply. delta_seq is the cheapest.
  @impl true
  def sync_writes(table) do
    _seq = delta_seq(table)
    :ok
  end

  @impl true
  def delta_seq(table) do
    {:ok, <<seq::64>>} = call(table, :delta_seq, [])
    seq
  end

  @impl true
  def take_delta(table) do
    case call(table, :take_delta, []) do
      {:ok, <<0>>} -> :none
      {:ok, <<1, seq::64, delta::binary>>} -> {seq, delta}
    end
  end

  @impl true
  def local_state(table) do
    {:ok, <<seq::64>>, chunks} = call(table, :local_state, [], &collect_state/3)
    {seq, Enum.reverse(chunks)}
  end

  defp collect_state(:more, chunk, acc), do: {:more, [chunk | acc]}
  defp collect_state(status, body, acc), do: {status, body, acc}

  @impl true
  def apply_delta(table, replica, delta) when is_binary(delta),
    do: replica_write(table, :apply_delta, [<<replica::64>>, delta])

  @impl true
  def sync_replica(table, replica, chunks) when is_list(chunks) do
    body = [<<replica::64, length(chunks)::32>> | Enum.map(chunks, &Wire.str/1)]
    replica_write(table, :sync_replica, body)
  end

  @impl true
  def drop_replica(table, replica) do
    {:ok, <<_flags, dropped::64, _changes::binary>>} = call(table, :drop_replica, <<replica::64>>)
    dropped
  end

  # Ids are made and kept here, not in the sidecar: they must outlive it,
  # as the NIF's live as long as its table.
  @impl true
  def replica_id(%Table{replication: replication}, name) when is_binary(name) do
    case :ets.lookup(replication, {:id, name}) do
      [{_, id}] ->
        id

      [] ->
        id = :ets.update_counter(replication, :last_id, 1, {:last_id, 0})
        :ets.insert(replication, {{:id, name}, id})
        id
    end
  end

  @impl true
  def replica_ids(%Table{replication: replication}),
    do: :ets.select(replication, [{{{:id, :"$1"}, :"$2"}, [], [{{:"$1", :"$2"}}]}])

  @impl true
  def forget_replica(%Table{replication: replication} = table, replica) do
    :ets.match_delete(replication, {{:id, :_}, replica})
    {:ok, <<_flags, dropped::64, _changes::binary>>} = call(table, :forget_replica, <<replica::64>>)
    dropped
  end

  # The port owner counts what the write changed before the reply comes.
  defp replica_write(table, op, body) do
    case call(table, op, body) do
      {:ok, _} -> :ok
      {:bad_delta, _} -> {:error, :bad_delta}
    end
  end

  # The NIF refuses an oversized meta before encoding it when its size
  # shows; external_size/1 is that bound here (it may overestimate a
  # little, so only a meta well past the limit is refused unencoded). The
  # exact check, on the encoded bytes, is the sidecar's.
  defp encode_meta(table, meta) do
    max = Table.max_meta_bytes(table)

    if :erlang.external_size(meta) > 2 * max + 1_024 do
      {:error, :meta_too_large}
    else
      encoded = :erlang.term_to_binary(meta)
      if byte_size(encoded) > max, do: {:error, :meta_too_large}, else: {:ok, encoded}
    end
  end

  ## Requests

  defp listing(table, op, body) do
    case call(table, op, body, &collect/3) do
      {:ok, [{_continues, last}]} -> :erlang.binary_to_term(last)
      {:ok, chunks} -> merge(chunks)
    end
  end

  # Chunks of a listing, newest first: each is a map of whole keys, except
  # that a key too large for one chunk continues in the next.
  defp merge(chunks) do
    chunks
    |> Enum.reverse()
    |> Enum.reduce(nil, fn {continues, term}, acc ->
      chunk = :erlang.binary_to_term(term)

      cond do
        acc == nil -> chunk
        continues -> Map.merge(acc, chunk, fn _key, a, b -> %{metas: a.metas ++ b.metas} end)
        true -> Map.merge(acc, chunk)
      end
    end)
  end

  defp collect(status, <<continues, term::binary>>, acc),
    do: {status, [{continues == 1, term} | acc]}

  defp call(table, op, body, collect \\ nil) do
    {epoch, port} = await_port(table, System.monotonic_time(:millisecond))
    id = :erlang.unique_integer([:positive])
    frame = Wire.request(op, id, reply_to(), body)

    try do
      Port.command(port, frame)
    rescue
      # Closed under us: the sidecar died; wait for its successor below.
      ArgumentError -> :closed
    end

    case await_reply(table, epoch, id, collect, [], @recheck_ms) do
      :retry -> call(table, op, body, collect)
      result -> result
    end
  end

  defp await_reply(table, epoch, id, collect, acc, timeout) do
    receive do
      {:drab_presence_reply, ^id, Wire.status(:more), body} ->
        {_, acc} = collect.(:more, body, acc)
        await_reply(table, epoch, id, collect, acc, timeout)

      {:drab_presence_reply, ^id, status, body} when collect == nil ->
        {Wire.status_name(status), body}

      {:drab_presence_reply, ^id, status, body} ->
        collect.(Wire.status_name(status), body, acc)
    after
      timeout ->
        cond do
          timeout == 0 ->
            :retry

          match?({^epoch, _}, Table.current(table)) ->
            await_reply(table, epoch, id, collect, acc, timeout)

          # The port owner routes every reply of a sidecar before it moves
          # to the next: one last look, then the request goes again.
          true ->
            await_reply(table, epoch, id, collect, acc, 0)
        end
    end
  end

  defp await_port(table, since) do
    case Table.current(table) do
      {epoch, port} when port != nil ->
        {epoch, port}

      {_epoch, nil} ->
        if System.monotonic_time(:millisecond) - since > @unavailable_ms do
          exit(
            {:sidecar_unavailable,
             "the presence sidecar did not come back in #{@unavailable_ms} ms"}
          )
        end

        Process.sleep(2)
        await_port(table, since)
    end
  end

  defp reply_to do
    case Process.get(__MODULE__) do
      nil ->
        id = Wire.pid_id(self())
        Process.put(__MODULE__, id)
        id

      id ->
        id
    end
  end
end
