# Cluster workloads (issue 8, item 6): Phoenix.Presence and Drab.Presence in
# cluster mode (through Phoenix.PubSub, over :pg, and on the sidecar backend
# over :pg), side by side in one run, each on 3 fresh :peer nodes on
# 127.0.0.1. Run it with `bench/run --only cluster` (or `bench/run cluster`),
# `--quick` for a smoke run well under a minute. Needs OTP 25+ (:peer) and a
# distributed coordinator (bench/run starts it with --name).
#
# The coordinator (this VM) is not one of the three presence nodes: it only
# drives and measures them, so that its own :erpc traffic stays off the
# byte counts (which only sum connections between presence nodes), and so
# that the node killed in the purge workload can be any of the three.
#
# Per implementation, on 3 new nodes A, B, C:
#   1. N presences tracked on each node at once, by 4 local callers: the time
#      until count_connections/1 (Phoenix: Drab 0.10's sum of list/1's
#      metas) equals 3N on every node, polled on each node;
#   2. bytes sent between the nodes for it, per presence (distribution
#      ports' send_oct, summed over the three nodes);
#   3. idle traffic per node per second, holding the 3N;
#   4. C tracks more, to hold BIG; the time until everyone sees it;
#   5. C is halted; the time until A and B count only their own 2N.
#
# Options: --quick, --out DIR (default bench/ for a full run with Phoenix:
# its section of bench/RESULTS.md; bench/tmp/CLUSTER.md otherwise).

for file <- ~w(harness report) do
  Code.require_file("support/#{file}.exs", __DIR__)
end

defmodule Bench.ClusterPeers do
  @moduledoc false
  # :peer nodes on 127.0.0.1 with this VM's code path (the project's
  # _build/bench ebins, Elixir's and ERL_LIBS's), and the cluster bench's
  # modules loaded from the coordinator's binaries.

  @doc "Starts a peer named `name`; returns `{peer_pid, node}`."
  def start(name, binaries) do
    # A halted node is a node death, not a partition: global must not cut
    # the survivors apart while they notice it (OTP 25's default does).
    args =
      Enum.flat_map(:code.get_path(), &[~c"-pa", &1]) ++
        [~c"-kernel", ~c"prevent_overlapping_partitions", ~c"false"]

    {:ok, peer, node} =
      :peer.start_link(%{name: name, host: ~c"127.0.0.1", longnames: true, args: args})

    # A halted node must not take the coordinator with it.
    Process.unlink(peer)
    {:ok, _} = :erpc.call(node, :application, :ensure_all_started, [:elixir])
    {:ok, _} = :erpc.call(node, :application, :ensure_all_started, [:drab_presence])

    for {module, binary} <- binaries do
      {:module, ^module} =
        :erpc.call(node, :code, :load_binary, [module, ~c"bench/support/cluster_node.exs", binary])
    end

    {peer, node}
  end

  @doc "Stops a peer; one already gone is fine."
  def stop(peer) do
    :peer.stop(peer)
  catch
    :exit, _ -> :ok
  end

  @doc "Connects every node to every other (no reliance on auto-connect)."
  def mesh(nodes) do
    for a <- nodes, b <- nodes, a < b do
      true = :erpc.call(a, :net_kernel, :connect_node, [b])
    end

    :ok
  end
end

defmodule Bench.Cluster do
  @moduledoc false
  import Bench.Harness, only: [progress: 1, start_clock: 0, elapsed_s: 0]
  alias Bench.{ClusterNode, ClusterPeers, Report}

  @topic "bench:cluster"
  @callers 4
  # Long enough for a Phoenix.Tracker broadcast (1.5 s) to follow a
  # convergence, so that bytes still on their way are counted.
  @settle_ms 2_000

  @cluster_start "<!-- cluster: written by bench/run --only cluster -->"
  @cluster_end "<!-- /cluster -->"

  def run(argv) do
    {opts, rest, invalid} =
      OptionParser.parse(argv, strict: [quick: :boolean, out: :string, only: :string])

    (invalid == [] and rest in [[], ["cluster"]]) ||
      raise ArgumentError, "unknown arguments: #{inspect(invalid ++ rest)}"

    opts[:only] in [nil, "cluster"] || raise ArgumentError, "--only takes: cluster"
    quick? = Keyword.get(opts, :quick, false)
    Process.put(:bench_role, "cluster bench coordinator")
    start_clock()

    Node.alive?() ||
      raise "the coordinator must be a distributed node: run it with bench/run --only cluster"

    Code.ensure_loaded?(:peer) || raise ":peer is missing: the cluster bench needs OTP 25+"

    sizes =
      if quick?,
        do: %{n: 2_000, big: 20_000, idle_s: 2, track_timeout: 30_000, purge_timeout: 5_000},
        else: %{n: 10_000, big: 100_000, idle_s: 30, track_timeout: 120_000, purge_timeout: 60_000}

    # Compiled here once; every node loads these binaries.
    binaries =
      Code.compile_file(Path.join(__DIR__, "support/cluster_node.exs"))
      |> Enum.map(fn {module, binary} -> {module, binary} end)

    impls = [
      Bench.ClusterImpl.Phoenix,
      Bench.ClusterImpl.Ours.Pubsub,
      Bench.ClusterImpl.Ours.Pg,
      Bench.ClusterImpl.Ours.PgSidecar
    ]

    phoenix? = Bench.ClusterImpl.phoenix?()

    unless phoenix? do
      IO.puts("""

      *** Phoenix is not on the code path: Phoenix.PubSub / Phoenix.Presence are
      *** absent, so there is nothing to compare with. Point ERL_LIBS at built
      *** phoenix and phoenix_pubsub to compare.
      """)
    end

    progress(
      "cluster bench: 3 nodes × #{Report.fmt(sizes.n)} presences, one node to " <>
        "#{Report.fmt(sizes.big)}; #{System.schedulers_online()} schedulers" <>
        if(quick?, do: " (--quick)", else: "")
    )

    results =
      for impl <- impls do
        case impl.available() do
          :ok ->
            progress("#{impl.name()}: starting 3 nodes")
            {impl, run_impl(impl, binaries, sizes)}

          {:unavailable, reason} ->
            progress("#{impl.name()}: skipped, #{reason}")
            {impl, {:unavailable, reason}}
        end
      end

    IO.puts("")
    IO.puts(table(results, sizes))
    IO.puts("")

    out = opts[:out] || if(phoenix? and not quick?, do: __DIR__, else: Path.join(__DIR__, "tmp"))
    write(results, sizes, out, phoenix?, quick?, argv)

    failed = for {impl, %{error: message}} <- results, do: {impl, message}

    if failed != [] do
      for {impl, message} <- failed, do: progress("FAILED #{impl.name()}: #{message}")
      System.halt(1)
    end
  end

  ## One implementation, on its own fresh nodes

  defp run_impl(impl, binaries, sizes) do
    tag = "#{System.pid()}_#{System.unique_integer([:positive])}"
    peers = for x <- ~w(a b c), do: ClusterPeers.start(:"cbench_#{tag}_#{x}", binaries)

    try do
      nodes = Enum.map(peers, &elem(&1, 1))
      measure(impl, nodes, sizes, %{})
    rescue
      exception -> %{error: Exception.message(exception)}
    catch
      kind, reason -> %{error: Exception.format(kind, reason)}
    after
      Enum.each(peers, fn {peer, _} -> ClusterPeers.stop(peer) end)
    end
  end

  defp measure(impl, [a, b, c] = nodes, sizes, r) do
    ClusterPeers.mesh(nodes)
    for node <- nodes, do: :ok = on(node, :start, [impl])
    ready(impl, nodes)

    # 1-2: N per node, tracked at once on all three.
    progress("  #{impl.name()}: #{Report.fmt(sizes.n)} tracks on each node")
    groups = for node <- nodes, do: {node, on(node, :prepare, [sizes.n])}
    sent0 = sent(nodes)
    watch(impl, nodes, 3 * sizes.n, :tracked, sizes.track_timeout)
    t0 = ClusterNode.now_us()
    done = track_on(impl, groups, "n")
    reached = reached(nodes, :tracked, sizes.track_timeout + 5_000)
    r = Map.put(r, :local_ms, ms(Enum.max(done) - t0))
    r = Map.put(r, :visible_ms, visible(reached, t0))

    progress(
      "    visible everywhere after #{show_ms(r.visible_ms)} (local tracks #{show_ms(r.local_ms)})"
    )

    Process.sleep(@settle_ms)
    r = Map.put(r, :bytes_per_presence, (sent(nodes) - sent0) / (3 * sizes.n))
    progress("    #{Report.fmt(r.bytes_per_presence)} bytes sent between nodes per presence")

    # 3: idle, holding 3N.
    before = per_node_sent(nodes)
    Process.sleep(sizes.idle_s * 1_000)
    idle = Enum.zip_with(per_node_sent(nodes), before, &((&1 - &2) / sizes.idle_s))
    r = Map.merge(r, %{idle_mean: Enum.sum(idle) / 3, idle_max: Enum.max(idle)})
    progress("    idle: #{Enum.map_join(idle, ", ", &Report.fmt/1)} bytes/s sent by A, B, C")

    # 4: C goes to BIG.
    more = sizes.big - sizes.n

    progress(
      "  #{impl.name()}: #{Report.fmt(more)} more tracks on C (C holds #{Report.fmt(sizes.big)})"
    )

    group = on(c, :prepare, [more])
    sent0 = sent(nodes)
    watch(impl, nodes, 2 * sizes.n + sizes.big, :big, sizes.track_timeout)
    t0 = ClusterNode.now_us()
    [done] = track_on(impl, [{c, group}], "big")
    reached = reached(nodes, :big, sizes.track_timeout + 5_000)
    r = Map.merge(r, %{big_local_ms: ms(done - t0), big_visible_ms: visible(reached, t0)})
    Process.sleep(@settle_ms)
    r = Map.put(r, :big_bytes_per_presence, (sent(nodes) - sent0) / more)

    progress(
      "    visible everywhere after #{show_ms(r.big_visible_ms)} (local tracks #{show_ms(r.big_local_ms)}); #{Report.fmt(r.big_bytes_per_presence)} bytes per presence"
    )

    # 5: C dies.
    progress(
      "  #{impl.name()}: halting C (#{Report.fmt(sizes.big)} presences); waiting up to #{div(sizes.purge_timeout, 1_000)} s"
    )

    watch(impl, [a, b], 2 * sizes.n, :purged, sizes.purge_timeout)
    t0 = ClusterNode.now_us()
    :erpc.cast(c, :erlang, :halt, [])
    reached = reached([a, b], :purged, sizes.purge_timeout + 10_000)
    r = Map.put(r, :purge_ms, visible(reached, t0))
    progress("    purged on A and B after #{show_ms(r.purge_ms)}")
    r
  end

  # Every node sees a presence of every other before anything is measured:
  # replication is up (Phoenix.Tracker finds its peers by heartbeat).
  defp ready(impl, nodes) do
    groups = for node <- nodes, do: {node, on(node, :prepare, [1])}
    watch(impl, nodes, 3, :ready, 30_000, "bench:ready")
    t0 = ClusterNode.now_us()
    track_on(impl, groups, "ready", "bench:ready")
    reached = reached(nodes, :ready, 35_000)

    case visible(reached, t0) do
      {:timeout, _} = timeout ->
        raise "replication never came up: #{show_ms(timeout)}"

      ms ->
        progress("    replication up (a presence per node seen everywhere) after #{show_ms(ms)}")
    end
  end

  ## Report

  defp rows(sizes) do
    n = Report.fmt(sizes.n)
    big = Report.fmt(sizes.big)

    [
      {"3 × #{n} tracks at once: visible in count_connections/1 on every node, ms", :visible_ms},
      {"… the slowest node's own tracks returned, ms", :local_ms},
      {"bytes sent between nodes per tracked presence (the 3 × #{n})", :bytes_per_presence},
      {"idle traffic per node, bytes/s (mean of 3, holding 3 × #{n})", :idle_mean},
      {"… the busiest node, bytes/s", :idle_max},
      {"one node up to #{big} (#{Report.fmt(sizes.big - sizes.n)} tracks): visible on every node, ms",
       :big_visible_ms},
      {"… C's own tracks returned, ms", :big_local_ms},
      {"… bytes sent between nodes per presence", :big_bytes_per_presence},
      {"node holding #{big} halted: gone from both others' counts, ms after the halt", :purge_ms}
    ]
  end

  @ours Bench.ClusterImpl.Ours.Pubsub

  defp table(results, sizes) do
    names = for {impl, _} <- results, do: impl.name()

    header =
      "| Measure | #{Enum.join(names, " | ")} | Phoenix ÷ Drab (PubSub) |\n" <>
        "|---|#{String.duplicate("--:|", length(names))}--:|"

    body =
      for {label, key} <- rows(sizes) do
        cells = for {_impl, result} <- results, do: cell(result, key, sizes)
        "| #{label} | #{Enum.join(cells, " | ")} | #{ratio(results, key)} |"
      end

    notes = for {impl, result} <- results, note = note(result), do: "* #{impl.name()}: #{note}"

    Enum.join([header | body], "\n") <>
      if(notes == [], do: "", else: "\n\n" <> Enum.join(notes, "\n"))
  end

  # The reason in the first row, so that an empty column says why.
  defp cell({:unavailable, reason}, :visible_ms, _sizes), do: "n/a: #{reason}"
  defp cell({:unavailable, _}, _key, _sizes), do: "n/a"

  defp cell(%{error: _} = r, key, sizes),
    do: if(Map.has_key?(r, key), do: value(r[key], key, sizes), else: "error")

  defp cell(r, key, sizes), do: value(Map.get(r, key), key, sizes)

  defp value(nil, _key, _sizes), do: "—"

  defp value({:timeout, _}, key, sizes) do
    timeout = if key == :purge_ms, do: sizes.purge_timeout, else: sizes.track_timeout
    "**> #{Report.fmt(timeout)}** (timed out)"
  end

  defp value(v, _key, _sizes), do: Report.fmt(v)

  defp note({:unavailable, reason}), do: reason
  defp note(%{error: message}), do: "failed: " <> message

  defp note(%{purge_ms: {:timeout, stuck}}),
    do:
      "after the halt, still counted: " <>
        Enum.map_join(stuck, ", ", fn {n, c} -> "#{short(n)} #{inspect(c)}" end)

  defp note(_), do: nil

  defp ratio(results, key) do
    with {_, %{^key => p}} when is_number(p) <-
           List.keyfind(results, Bench.ClusterImpl.Phoenix, 0),
         {_, %{^key => d}} when is_number(d) and d > 0 <- List.keyfind(results, @ours, 0) do
      Report.fmt(p / d)
    else
      _ -> "—"
    end
  end

  defp write(results, sizes, out, phoenix?, quick?, argv) do
    File.mkdir_p!(out)
    section = section(results, sizes, phoenix?, quick?, argv)

    path =
      if Path.expand(out) == Path.expand(__DIR__),
        do: Path.join(out, "RESULTS.md"),
        else: Path.join(out, "CLUSTER.md")

    text =
      case File.read(path) do
        {:ok, old} -> splice(old, section)
        _ -> section <> "\n"
      end

    File.write!(path, text)
    progress("wrote #{Path.relative_to_cwd(path)}")
  end

  # Replaces the cluster section of an existing file, else puts it before the
  # hand-written analysis (bench/RESULTS.md), else at the end.
  defp splice(old, section) do
    analysis = "<!-- analysis: hand-written, kept by bench/run -->"

    cond do
      String.contains?(old, @cluster_start) and String.contains?(old, @cluster_end) ->
        [before, rest] = String.split(old, @cluster_start, parts: 2)
        [_, after_] = String.split(rest, @cluster_end, parts: 2)
        before <> section <> after_

      String.contains?(old, analysis) ->
        [before, rest] = String.split(old, analysis, parts: 2)
        before <> section <> "\n\n" <> analysis <> rest

      true ->
        String.trim_trailing(old) <> "\n\n" <> section <> "\n"
    end
  end

  defp section(results, sizes, phoenix?, quick?, argv) do
    command =
      Enum.join(["bench/run", "--only", "cluster" | argv -- ["--only", "cluster", "cluster"]], " ")

    date = Calendar.strftime(DateTime.utc_now(), "%Y-%m-%d %H:%M UTC")

    """
    #{@cluster_start}

    ## Cluster: 3 nodes (issue 8)

    Written by `#{if phoenix?, do: "ERL_LIBS=<built phoenix, phoenix_pubsub> ", else: ""}#{command}`
    on #{date}; it took #{round(elapsed_s())} s#{if quick?, do: " (--quick: smaller sizes)", else: ""}.
    Same machine and versions as above, with Erlang/OTP #{:erlang.system_info(:otp_release)}'s `:peer`;
    drab_presence at commit #{revision()}. Lower is better everywhere; the last
    column is Phoenix ÷ Drab.Presence (PubSub).
    #{if phoenix?, do: "", else: "\n**Phoenix was not on the code path: nothing to compare with.**\n"}
    * Each implementation runs on 3 fresh `:peer` nodes on 127.0.0.1 (Erlang
      distribution over loopback TCP), started from a coordinator VM that only
      drives and measures them; the nodes are fully meshed, and replication is
      checked to be up (a presence of each node seen on all) before anything
      is timed. Both run on their defaults: Phoenix.Presence (`Phoenix.Tracker`:
      broadcast every 1.5 s, `down_period` 30 s) and Drab.Presence in cluster
      mode (`diff_window` 50 ms, heartbeat 1.5 s), over a `Phoenix.PubSub` server
      (PG2 adapter) on every node, and Drab.Presence again over OTP's `:pg`.
    * Tracks are made by #{@callers} caller processes per node, for distinct idle
      processes of that node, as channel processes would. Visibility is polled
      on every node: `count_connections/1` (Phoenix: Drab 0.10's, the sum of
      the metas of `list/1`) until it equals the total; the time is when that
      poll returned, from the start of the tracks (OS clock, shared by the
      nodes). A watcher sleeps 10 ms between polls, or twice the last poll's
      duration, so that it takes at most a third of a scheduler: Phoenix's
      figures are coarser by up to that (a `list/1` of 30k takes tens of ms).
    * Bytes are the distribution ports' `send_oct`, summed over the three
      nodes and only between them, from just before the tracks to
      #{Report.fmt(@settle_ms)} ms after the last node saw them (heartbeats included), divided
      by the presences tracked. Idle traffic is the same counters over
      #{sizes.idle_s} s once that settled. Phoenix.Tracker sends a heartbeat
      only every `max_silent_periods` (10) broadcast periods when nothing
      changes, that is every 15 s, and Erlang's net tick goes out every 15 s
      on a silent connection: a window under 15 s (`--quick`) can show 0.
    * Purge: the node holding #{Report.fmt(sizes.big)} is halted (`:erlang.halt/0`
      through `:erpc.cast/4`); the time is until both other nodes count only
      their own presences, with a timeout of #{div(sizes.purge_timeout, 1_000)} s.
    * The machine has 2 cores shared by 4 VMs (and by other work): compare
      the columns, measured in one run, rather than absolute times.

    #{table(results, sizes)}

    #{@cluster_end}
    """
    |> String.trim_trailing()
  end

  defp track_on(impl, groups, prefix, topic \\ @topic) do
    groups
    |> Enum.map(fn {node, group} ->
      Task.async(fn ->
        on(node, :track, [impl, group, topic, "#{prefix}-#{node}", @callers], :infinity)
      end)
    end)
    |> Enum.map(&Task.await(&1, :infinity))
  end

  defp watch(impl, nodes, target, tag, timeout, topic \\ @topic) do
    for node <- nodes, do: on(node, :watch, [impl, topic, target, self(), tag, timeout])
  end

  # `{node, reached_us | :timeout, detail}` from every node's watcher.
  defp reached(nodes, tag, timeout) do
    for node <- nodes do
      receive do
        {^tag, ^node, at, detail} -> {node, at, detail}
      after
        timeout -> {node, :timeout, :no_answer}
      end
    end
  end

  # ms from t0 until the last node saw it, or {:timeout, counts}.
  defp visible(reached, t0) do
    case for({node, :timeout, count} <- reached, do: {node, count}) do
      [] -> ms(Enum.max(for {_, at, _} <- reached, do: at) - t0)
      stuck -> {:timeout, stuck}
    end
  end

  defp ms(us), do: us / 1_000

  defp revision do
    case System.cmd("git", ["rev-parse", "--short", "HEAD"], stderr_to_stdout: true) do
      {commit, 0} -> String.trim(commit)
      _ -> "unknown"
    end
  rescue
    _ -> "unknown"
  end

  defp show_ms({:timeout, stuck}),
    do:
      "TIMEOUT (counts then: #{Enum.map_join(stuck, ", ", fn {n, c} -> "#{short(n)} #{inspect(c)}" end)})"

  defp show_ms(nil), do: "—"
  defp show_ms(v), do: "#{Report.fmt(v)} ms"

  defp short(node),
    do: node |> Atom.to_string() |> String.split("@") |> hd() |> String.split("_") |> List.last()

  defp sent(nodes), do: Enum.sum(per_node_sent(nodes))
  defp per_node_sent(nodes), do: for(node <- nodes, do: on(node, :dist_sent, [nodes]))

  defp on(node, function, args, timeout \\ 60_000),
    do: :erpc.call(node, ClusterNode, function, args, timeout)
end

Bench.Cluster.run(System.argv())
