defmodule Bench.Floors do
  @moduledoc false
  # What the BEAM itself takes on this machine for work that the workloads
  # cannot avoid, with no presence system involved: processes exiting,
  # monitoring a process, building a listed map, copying a diff into a
  # subscriber. They put the figures of both systems, and the targets, in
  # proportion.
  import Bench.Harness

  @meta %{online_at: 1_700_000_000}

  @doc "Returns [{what, n, value, unit}]."
  def run(exit_n, map_sizes, diff_sizes) do
    [exit_floor(exit_n) | monitor_floor(exit_n)] ++
      Enum.flat_map(map_sizes, &map_floors/1) ++ Enum.map(diff_sizes, &copy_floor/1)
  end

  # Processes linked to one herd process, which is killed.
  defp exit_floor(n) do
    {herd, pids} = spawn_herd(n)
    t0 = now()
    Process.exit(herd, :kill)
    wait_until(fn -> not Enum.any?(pids, &Process.alive?/1) end, "herd exit", 60_000)
    {"exit of N untracked processes, until all are dead", n, since_us(t0) / 1_000, "ms"}
  end

  # One process monitoring N idle processes, as a tracker must: the time of
  # a call, and the memory a monitor takes (both ends, the monitoring
  # process's references left out).
  defp monitor_floor(n) do
    {_, pids} = herd = spawn_herd(n)
    before = gc_memory([self()])
    {us, refs} = :timer.tc(fn -> Enum.map(pids, &Process.monitor/1) end)
    bytes = (gc_memory([self()]) - before) / n
    Enum.each(refs, &Process.demonitor/1)
    kill_herd(herd)

    [
      {"Process.monitor/1 of an idle process, per call", n, us / n, "µs"},
      {"memory of one such monitor (:erlang.memory(:total))", n, bytes, "B"}
    ]
  end

  # A map shaped as list/1 returns it: built by decoding its external term
  # format (what Drab.Presence's NIF does), and from prebuilt {key, value}
  # pairs (the least any builder of the map pays).
  defp map_floors(n) do
    presences = listed(n)
    etf = :erlang.term_to_binary(presences)
    pairs = Map.to_list(presences)

    [
      {"binary_to_term/1 of a listed map's external format", n,
       sample(fn -> :erlang.binary_to_term(etf) end, check: &(map_size(&1) == n)), "µs"},
      {":maps.from_list/1 of a listed map's prebuilt pairs", n,
       sample(fn -> :maps.from_list(pairs) end, check: &(map_size(&1) == n)), "µs"}
    ]
  end

  # One send of a diff of N joins: the copy every subscriber process costs.
  defp copy_floor(n) do
    diff = %{joins: listed(n), leaves: %{}}
    pid = spawn(fn -> drain() end)
    us = sample(fn -> send(pid, diff) end, check: &is_map/1)
    Process.exit(pid, :kill)
    {"send of a diff of N joins to a process (copying it)", n, us / 1, "µs"}
  end

  defp drain do
    receive do
      _ -> :erlang.hibernate(__MODULE__, :drain_again, [])
    end
  end

  @doc false
  def drain_again, do: drain()

  defp listed(n) do
    Map.new(1..n, fn i ->
      ref = Base.encode64(<<i::64>>)
      {"user:#{i}", %{metas: [Map.put(@meta, :phx_ref, ref)]}}
    end)
  end
end
