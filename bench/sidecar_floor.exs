# Where a sidecar track's time goes: the same 10k tracks from 4 callers,
# in one VM, rounds taking the variants in turn (so that the VM's drift
# hits them alike):
#
#   * route only: the sidecar binary behind a port whose owner only routes
#     each reply to its caller, by the id in it. The floor of this design:
#     two pipe crossings, the sidecar's work, one hop through the owner;
#   * backend: `Drab.Presence` on `backend: :sidecar`, which also checks
#     the input, encodes the meta, journals and counts each reply in the
#     port owner, and has a monitor process watch each new owner;
#   * decided on the BEAM side (a sketch, not a backend): what a caller
#     that does not wait for the sidecar would pay. It takes a lock on the
#     owner in ETS, decides `already_tracked` and makes the ref there,
#     journals and counts, sends the owner's monitor process a watch when
#     the owner is new, writes the track to the port, and returns. It has
#     none of what makes a backend (restarts, replay, owed leaves, other
#     writes); the sidecar still answers each track, and the router drops
#     the answer. It measures whether such a design could meet the 15 µs
#     target before anyone builds it;
#   * NIF: the same module on the default backend, for scale.
#
#   MIX_ENV=bench mix run bench/sidecar_floor.exs [rounds]   (default 7)

alias Drab.Presence.Backend.Sidecar
alias Drab.Presence.Sidecar.Wire

rounds = String.to_integer(List.first(System.argv()) || "7")

defmodule Bench.SidecarFloor.OnSidecar do
  use Drab.Presence, otp_app: :drab_presence, backend: :sidecar
end

defmodule Bench.SidecarFloor.OnNif do
  use Drab.Presence, otp_app: :drab_presence
end

defmodule Bench.SidecarFloor do
  @n 10_000
  @callers 4
  @meta %{online_at: 1_700_000_000}

  # The sidecar alone, after the handshake, with a router for a port owner.
  def open_routed(path) do
    port = Port.open({:spawn_executable, path}, [:binary, {:packet, 4}, :use_stdio])
    :ok = handshake(port, 1, [<<1, 1::64, 0::64>>, "DRPS", <<Wire.version()::16>>])
    :ok = handshake(port, 2, [<<2, 2::64, 0::64>>, <<100_000::64, 0::8>>])
    router = spawn_link(fn -> route(port, Wire.pid_template()) end)
    Port.connect(port, router)
    send(router, :connected)
    port
  end

  defp handshake(port, op, frame) do
    Port.command(port, frame)

    receive do
      {^port, {:data, <<^op, _id::64, 0::64, 0, _::binary>>}} -> :ok
    after
      5_000 -> raise "the sidecar did not answer op #{op}"
    end
  end

  defp route(port, template) do
    receive do
      {^port, {:data, <<_op, id::64, to::64, status, _::binary>>}} ->
        if to != 0, do: send(Wire.id_pid(template, to), {:routed, id, status})
        route(port, template)

      _ ->
        route(port, template)
    end
  end

  # µs per track, every call returned, from @callers callers.
  def routed_round(port, round) do
    meta = :erlang.term_to_binary(@meta)

    # The owners' exits afterwards, as the backend's monitors send them, so
    # that every round starts from the same table.
    exits = fn owners ->
      for owner <- owners, do: Port.command(port, [<<20, 0::64, 0::64, Wire.pid_id(owner)::64>>])
    end

    run(exits, fn owner, i ->
      to = Wire.pid_id(self())
      body = [<<Wire.pid_id(owner)::64>>, str("floor:#{round}"), str("u#{i}"), meta]
      Port.command(port, [<<16, i::64, to::64>> | body])

      receive do
        {:routed, ^i, 0} -> :ok
        {:routed, ^i, status} -> raise "track refused with status #{status}"
      end
    end)
  end

  # The sketch's ETS tables and monitor processes, on the routed port.
  def open_sketch(port) do
    tables = %{
      journal: :ets.new(:sketch_journal, [:ordered_set, :public]),
      counts: :ets.new(:sketch_counts, [:set, :public, write_concurrency: true]),
      owners: :ets.new(:sketch_owners, [:set, :public, write_concurrency: true]),
      locks: :ets.new(:sketch_locks, [:set, :public, write_concurrency: true]),
      port: port
    }

    watchers = for _ <- 1..System.schedulers_online(), do: spawn_link(fn -> watch(tables, %{}) end)

    Map.put(tables, :watchers, List.to_tuple(watchers))
  end

  # On DOWN: the owner's rows go, and its exit goes to the sidecar, as the
  # backend's monitors do, so that every round starts from the same table.
  defp watch(tables, monitors) do
    receive do
      {:watch, pid} ->
        watch(tables, Map.put_new_lazy(monitors, pid, fn -> Process.monitor(pid) end))

      {:DOWN, _, :process, pid, _} ->
        owner = Wire.pid_id(pid)
        :ets.select_delete(tables.journal, [{{{owner, :_, :_}, :_, :_}, [], [true]}])
        :ets.delete(tables.owners, owner)
        Port.command(tables.port, [<<20, 0::64, 0::64, owner::64>>])
        watch(tables, Map.delete(monitors, pid))
    end
  end

  def sketch_round(t, round) do
    run(fn _owners -> :ok end, fn owner, i ->
      {:ok, _ref} = sketch_track(t, owner, "sketch:#{round}", "u#{i}", @meta)
    end)
  end

  defp sketch_track(t, pid, topic, key, meta) do
    owner = Wire.pid_id(pid)
    true = :ets.insert_new(t.locks, {owner, self()})
    meta = :erlang.term_to_binary(meta)

    if :ets.update_counter(t.owners, owner, 1, {owner, 0}) == 1 do
      send(elem(t.watchers, :erlang.phash2(owner, tuple_size(t.watchers))), {:watch, pid})
    end

    ref = :erlang.unique_integer([:positive])

    result =
      if :ets.insert_new(t.journal, {{owner, topic, key}, ref, meta}) do
        users =
          if :ets.update_counter(t.counts, {topic, key}, 1, {{topic, key}, 0}) == 1,
            do: 1,
            else: 0

        :ets.update_counter(t.counts, topic, [{2, users}, {3, 1}], {topic, 0, 0})
        Port.command(t.port, [<<16, ref::64, 0::64, owner::64>>, str(topic), str(key), meta])
        {:ok, ref}
      else
        {:error, :already_tracked}
      end

    :ets.delete(t.locks, owner)
    result
  end

  def module_round(module, round) do
    run(fn _owners -> :ok end, fn owner, i ->
      {:ok, _} = module.track(owner, "floor:#{round}", "u#{i}", @meta)
    end)
  end

  defp run(after_round, track) do
    owners = for _ <- 1..@n, do: spawn(fn -> receive(do: (:stop -> :ok)) end)
    parent = self()
    t0 = System.monotonic_time(:microsecond)

    for chunk <- Enum.chunk_every(Enum.with_index(owners), div(@n, @callers)) do
      spawn_link(fn ->
        for {owner, i} <- chunk, do: track.(owner, i)
        send(parent, :done)
      end)
    end

    for _ <- 1..@callers, do: receive(do: (:done -> :ok))
    us = (System.monotonic_time(:microsecond) - t0) / @n
    Enum.each(owners, &send(&1, :stop))
    after_round.(owners)
    us
  end

  defp str(bytes), do: [<<byte_size(bytes)::32>>, bytes]

  def summary(values) do
    sorted = Enum.sort(values)
    median = Enum.at(sorted, div(length(sorted), 2))
    :io_lib.format("~.1f (~.1f-~.1f)", [median, hd(sorted), List.last(sorted)])
  end
end

alias Bench.SidecarFloor
alias Bench.SidecarFloor.{OnNif, OnSidecar}

{:ok, _} = OnSidecar.start_link()
{:ok, _} = OnNif.start_link()
port = SidecarFloor.open_routed(Sidecar.executable())
sketch = SidecarFloor.open_sketch(port)

variants = [
  {"route only (the sidecar, a router as port owner)", &SidecarFloor.routed_round(port, &1)},
  {"backend: :sidecar", &SidecarFloor.module_round(OnSidecar, &1)},
  {"decided on the BEAM side (a sketch)", &SidecarFloor.sketch_round(sketch, &1)},
  {"backend: :nif", &SidecarFloor.module_round(OnNif, &1)}
]

IO.puts("#{System.schedulers_online()} schedulers; #{rounds} rounds of 10k tracks, 4 callers")
# Warm-up, unreported.
for {_, round} <- variants, do: round.(0)

results =
  for r <- 1..rounds, {label, round} <- variants do
    us = round.(r)
    IO.puts("  round #{r}, #{label}: #{Float.round(us, 2)} µs per track")
    {label, us}
  end

IO.puts("\nµs per track, median (min-max):")

for {label, _} <- variants do
  IO.puts("  #{label}: #{SidecarFloor.summary(for {^label, us} <- results, do: us)}")
end
