defmodule Bench.Report do
  @moduledoc false
  # The figures of a run: kept as {size, metric} => %{system => value}, and
  # printed as a table (console and markdown), a targets table, and a plot.
  # The ratio column is how many times Drab.Presence is better (below 1:
  # worse): Phoenix ÷ Drab for the lower-is-better metrics (most), Drab ÷
  # Phoenix for the higher-is-better ones, none where better is undefined.

  # {key, workload, what is measured}
  @metrics [
    {:track_us, "1. track", "µs per track, until every track has returned"},
    {:track_diff_ms, "1. track", "ms until the last diff reached a subscriber"},
    {:untrack_us, "2. untrack", "µs per untrack, until every untrack has returned"},
    {:untrack_diff_ms, "2. untrack", "ms until the last diff reached a subscriber"},
    {:disconnect_empty_ms, "3. mass disconnect", "ms until list/1 is empty"},
    {:disconnect_diff_ms, "3. mass disconnect", "ms until the last leave diff was delivered"},
    {:list_us, "4. reads", "list/1, µs (median)"},
    {:update_list_us, "4. reads", "one update, then list/1, µs (median)"},
    {:count_users_us, "4. reads", "count_users/1, µs (median)"},
    {:count_connections_us, "4. reads", "count_connections/1, µs (median)"},
    {:memory_beam_b, "5. memory", "bytes per presence, BEAM (:erlang.memory(:total))"},
    {:memory_nif_b, "5. memory", "bytes per presence, NIF heap (stats().nif_heap_bytes)"},
    {:memory_b, "5. memory", "bytes per presence, sum"},
    {:memory_kept_listing_b, "5. memory",
     "bytes per presence, what listing every topic once adds (a kept listing; not in the sum)"},
    {:storm_diffs, "6. join storm", "presence_diff messages delivered"},
    {:storm_converge_ms, "6. join storm", "ms until every subscriber's view equals list/1"},
    {:track_tick_ms, "7. scheduler", "1 ms ticker during track: worst lateness, ms"},
    {:track_tick_p99_ms, "7. scheduler", "1 ms ticker during track: 99th-percentile lateness, ms"},
    {:reads_tick_ms, "7. scheduler", "1 ms ticker during reads: worst lateness, ms"},
    {:lists_tick_ms, "7. scheduler", "1 ms ticker during 4 concurrent listers: worst lateness, ms"},
    {:lists_tick_p99_ms, "7. scheduler",
     "1 ms ticker during 4 concurrent listers: 99th-percentile lateness, ms"},
    {:concurrent_lists_per_s, "7. scheduler",
     "list/1 calls per second by 4 concurrent listers (higher is better)"},
    {:churn_ops_s, "8. churn", "operations per second achieved (higher is better)"},
    {:churn_p50_ms, "8. churn", "diff latency, from operation to subscriber: p50, ms"},
    {:churn_p99_ms, "8. churn", "diff latency: p99, ms"},
    {:churn_max_ms, "8. churn", "diff latency: max, ms"},
    {:channels_join_ms, "9. channel join storm",
     "ms until every client's phoenix.js view equals list/1"},
    {:channels_join_us, "9. channel join storm", "µs per join (that time ÷ N)"},
    {:channels_leave_ms, "9. channel leave storm",
     "ms until every watcher's phoenix.js view is empty"},
    {:channels_leave_us, "9. channel leave storm", "µs per leave (that time ÷ N)"}
  ]

  @details [
    {:track_reductions, "1. track", "reductions per track (all processes; NIF work not counted)"},
    {:track_diffs, "1. track", "presence_diff messages the subscriber received"},
    {:disconnect_list_timeouts, "3. mass disconnect",
     "list/1 calls that exited with a timeout (5 s) while polling"},
    {:reads_tick_p99_ms, "7. scheduler", "1 ms ticker during reads: 99th-percentile lateness, ms"},
    {:churn_ops, "8. churn", "operations (track, untrack, update) in all"},
    {:churn_changes, "8. churn", "changes delivered and timed (joins + leaves)"},
    {:churn_diffs_topic_s, "8. churn", "presence_diff messages per topic per second, during churn"},
    {:churn_interval_ms, "8. churn", "mean gap between two diffs of a topic during churn, ms"},
    {:churn_interval_max_ms, "8. churn",
     "longest gap between two diffs of a topic during churn, ms"},
    {:churn_drain_ms, "8. churn", "last diff after the churn stopped, ms"},
    {:channels_encode_ms, "9. channel join storm",
     "floor: JSON-encoding the N presence_state pushes, ms (estimated)"},
    {:channels_join_frames, "9. channel join storm",
     "frames written to the clients (join replies, presence_state, presence_diff)"},
    {:channels_join_kb, "9. channel join storm", "KB written per client"},
    {:channels_leave_frames, "9. channel leave storm", "frames written to the watchers"}
  ]

  @higher_is_better [:churn_ops_s, :concurrent_lists_per_s]
  @no_ratio [
    :churn_ops,
    :churn_changes,
    :churn_diffs_topic_s,
    :churn_interval_ms,
    :churn_interval_max_ms,
    :channels_encode_ms
  ]

  @systems [:drab, :phoenix]

  def new, do: %{sizes: [], values: %{}, errors: [], floors: [], stalls: [], idle: nil}

  @doc "Adds a workload's figures; `*_stalls` entries are descriptions, kept apart."
  def put(report, size, system, figures) do
    {stalls, numbers} =
      Enum.split_with(figures, fn {metric, _} -> String.ends_with?("#{metric}", "_stalls") end)

    values =
      Enum.reduce(numbers, report.values, fn {metric, value}, values ->
        Map.update(values, {size, metric}, %{system => value}, &Map.put(&1, system, value))
      end)

    stalls =
      for {metric, descriptions} <- stalls,
          do: {size, system, "#{metric}" |> String.trim_trailing("_stalls"), descriptions}

    sizes = if size in report.sizes, do: report.sizes, else: report.sizes ++ [size]
    %{report | values: values, sizes: sizes, stalls: report.stalls ++ stalls}
  end

  @doc "Puts `system`'s figures of size `from` under size `to` too (a row compared with them)."
  def copy(report, from, to, system) do
    figures = for {{^from, metric}, %{^system => value}} <- report.values, do: {metric, value}

    if figures == [], do: report, else: put(report, to, system, figures)
  end

  def error(report, size, system, workload, message) do
    %{report | errors: report.errors ++ [{size, system, workload, message}]}
  end

  def get(report, size, metric, system), do: get_in(report.values, [{size, metric}, system])

  @doc """
  The table rows: {workload, what, size, drab, sidecar, phoenix, ratio,
  sidecar cost}, as strings. `drab` is the NIF backend; the sidecar cost is
  how many times the NIF's figure the sidecar's is (lower is better).
  """
  def rows(report, metrics \\ @metrics) do
    for {metric, workload, what} <- metrics,
        size <- report.sizes,
        Map.has_key?(report.values, {size, metric}) do
      drab = get(report, size, metric, :drab)
      sidecar = get(report, size, metric, :sidecar)
      phoenix = get(report, size, metric, :phoenix)

      [
        workload,
        what,
        size,
        fmt(drab),
        fmt(sidecar),
        fmt(phoenix),
        ratio(metric, phoenix, drab),
        ratio(metric, sidecar, drab)
      ]
    end
  end

  @doc "Prints the rows of one size to the console."
  def print_size(report, size) do
    for metrics <- [@metrics, @details],
        [workload, what, ^size, drab, sidecar, phoenix, ratio, cost] <- rows(report, metrics) do
      IO.puts(
        "    #{String.pad_trailing("#{workload}: #{what}", 92)} " <>
          "#{String.pad_leading(drab, 11)} #{String.pad_leading(sidecar, 11)} " <>
          "#{String.pad_leading(phoenix, 11)}  #{ratio}  #{cost}"
      )
    end

    for {^size, system, phase, descriptions} <- report.stalls, descriptions != [] do
      IO.puts(
        "      longest stalls, #{system_name(system)}, #{phase}: #{Enum.join(descriptions, "; ")}"
      )
    end
  end

  def print_floors(floors) do
    for [what, n, value] <- floor_rows(floors) do
      IO.puts("    #{String.pad_trailing(what, 70)} N = #{String.pad_trailing(n, 7)} #{value}")
    end
  end

  defp floor_rows(floors) do
    for {what, n, value, unit} <- floors, do: [what, fmt(n), "#{fmt(value)} #{unit}"]
  end

  def print_header do
    IO.puts(
      "    #{String.pad_trailing("", 92)} #{String.pad_leading("Drab", 11)} " <>
        "#{String.pad_leading("Phoenix", 11)}  Phoenix ÷ Drab"
    )
  end

  # --- targets -------------------------------------------------------------

  # {what, size, metric, Phoenix as the issue measured it, target, limit}
  @targets [
    {"track, µs per track", "1k", :track_us, "", "≤ 2", 2},
    {"track, µs per track", "10k", :track_us, "~20", "≤ 2", 2},
    {"track, µs per track", "100k", :track_us, "~40", "≤ 2", 2},
    {"track, µs per track", "1M", :track_us, "", "≤ 2", 2},
    {"track, µs per track", "10k / 1k topics", :track_us, "", "≤ 2", 2},
    {"untrack, µs per untrack", "100k", :untrack_us, "~38", "≤ 2", 2},
    {"mass disconnect, ms until list/1 is empty", "100k", :disconnect_empty_ms, "~3,800", "≤ 200",
     200},
    {"list/1, µs", "10k", :list_us, "~7,000", "≤ 1,000", 1_000},
    {"list/1, µs", "100k", :list_us, "~300,000", "≤ 20,000", 20_000},
    {"list/1, µs: within 2× the :maps.from_list floor, issue 20", "10k", :list_us, "19,760",
     "≤ 2× floor", {:from_list_floor, 10_000, 2}},
    {"list/1, µs: within 3× the :maps.from_list floor, issue 20", "100k", :list_us, "427,000",
     "≤ 3× floor", {:from_list_floor, 100_000, 3}},
    {"count_users/1, µs (Phoenix: Drab's way)", "10k", :count_users_us, "~7,500", "≤ 1", 1},
    {"count_users/1, µs (Phoenix: Drab's way)", "100k", :count_users_us, "~300,000", "≤ 1", 1},
    {"memory per presence, bytes (ours: BEAM + NIF)", "100k", :memory_b, "~1,100", "≤ 300", 300},
    {"memory per presence, bytes (ours: BEAM + NIF), issue 17", "100k", :memory_b, "804", "≤ 400",
     400},
    {"memory per presence, bytes (ours: BEAM + NIF), issue 17", "100k / 100k topics", :memory_b,
     "1,218", "≤ 400", 400},
    {"scheduler: 1 ms-ticker p99 lateness during 100k tracks, ms", "100k", :track_tick_p99_ms,
     "6.8", "≤ Phoenix's", :phoenix},
    {"scheduler: worst 1 ms-ticker lateness during 1M tracks, ms", "1M", :track_tick_ms, "", "< 20",
     20},
    {"join storm, presence_diff messages delivered", "5k subscribers", :storm_diffs, "25,000,000",
     "≤ 250,000", 250_000},
    {"join storm, ms until every view equals list/1", "5k subscribers", :storm_converge_ms,
     "~18,000", "≤ 500", 500},
    {"scheduler: worst 1 ms-ticker lateness during 100k reads (list, counts), ms", "100k",
     :reads_tick_ms, "", "≤ 2", {:tick, 2}},
    {"diff latency under churn (50 topics), p99, ms: 2× the 50 ms window", :churn, :churn_p99_ms,
     "", "≤ 100", 100},
    {"channel join storm, ms until every phoenix.js view equals list/1 (issue 20)", "5k channels",
     :channels_join_ms, "", "≤ Phoenix's ÷ 10", {:phoenix_over, 10}}
  ]

  @doc "The targets table rows: {what, N, issue's Phoenix, Phoenix here, ours, target, verdict}."
  def targets(report) do
    for {what, size, metric, issue, target, limit} <- @targets do
      size = if size == :churn, do: Enum.find(report.sizes, "churn", &churn?/1), else: size
      drab = get(report, size, metric, :drab)
      phoenix = get(report, size, metric, :phoenix)

      verdict =
        case limit do
          :phoenix -> relative_verdict(drab, phoenix, 1)
          {:phoenix_over, times} -> relative_verdict(drab, phoenix, times)
          {:from_list_floor, n, factor} -> floor_verdict(drab, report.floors, n, factor)
          limit -> verdict(drab, limit, report.idle)
        end

      [what, size, issue, fmt(phoenix), fmt(drab), target, verdict]
    end
  end

  defp relative_verdict(drab, phoenix, times) when is_number(drab) and is_number(phoenix),
    do: if(drab * times <= phoenix, do: "met", else: "missed")

  defp relative_verdict(_drab, _phoenix, _times), do: "not run"

  defp floor_verdict(drab, floors, n, factor) when is_number(drab) do
    case for({":maps.from_list" <> _, ^n, us, _} <- floors, do: us) do
      [floor_us | _] ->
        ratio = "#{fmt(drab / floor_us)}× the floor of #{fmt(floor_us)} µs"
        if drab <= factor * floor_us, do: "met (#{ratio})", else: "**missed** (#{ratio})"

      [] ->
        "not run (no floor at #{fmt(n)})"
    end
  end

  defp floor_verdict(_drab, _floors, _n, _factor), do: "not run"

  defp verdict(nil, _limit, _idle), do: "not run"
  defp verdict(value, {:tick, limit}, _idle) when value <= limit, do: "met"

  # A ticker late by more than the target with nothing running cannot show
  # whether a workload meets it.
  defp verdict(value, {:tick, _limit}, %{worst_us: idle_us}) when value <= idle_us / 1_000,
    do: "not measurable here: an idle VM's ticker is #{fmt(idle_us / 1_000)} ms late at worst"

  defp verdict(value, {:tick, limit}, idle), do: verdict(value, limit, idle)
  defp verdict(value, limit, _idle) when value <= limit, do: "met"
  defp verdict(_value, _limit, _idle), do: "**missed**"

  # --- formatting ------------------------------------------------------------

  def fmt(nil), do: "—"
  def fmt(v) when is_integer(v), do: thousands(v)
  def fmt(v) when abs(v) >= 100, do: thousands(round(v))
  def fmt(v) when abs(v) >= 10, do: :erlang.float_to_binary(v / 1, decimals: 1)
  def fmt(v) when abs(v) >= 1, do: :erlang.float_to_binary(v / 1, decimals: 2)
  def fmt(v), do: :erlang.float_to_binary(v / 1, decimals: 3)

  defp thousands(i) when i < 0, do: "-" <> thousands(-i)

  defp thousands(i) do
    i
    |> Integer.to_string()
    |> String.reverse()
    |> String.graphemes()
    |> Enum.chunk_every(3)
    |> Enum.join(",")
    |> String.reverse()
  end

  defp ratio(metric, _, _) when metric in @no_ratio, do: ""
  defp ratio(metric, phoenix, drab) when metric in @higher_is_better, do: ratio(drab, phoenix)
  defp ratio(_metric, phoenix, drab), do: ratio(phoenix, drab)

  defp ratio(nil, _), do: ""
  defp ratio(_, nil), do: ""
  defp ratio(phoenix, drab) when drab <= 0 or phoenix <= 0, do: ""

  defp ratio(phoenix, drab) do
    r = phoenix / drab
    if r >= 100, do: "×#{thousands(round(r))}", else: "×#{fmt(r)}"
  end

  # --- markdown --------------------------------------------------------------

  @analysis_start "<!-- analysis: hand-written, kept by bench/run -->"
  @analysis_end "<!-- /analysis -->"

  @cluster_start "<!-- cluster: written by bench/run --only cluster -->"
  @cluster_end "<!-- /cluster -->"

  @doc """
  Writes the results as markdown. A hand-written analysis section of an
  earlier RESULTS.md (between the analysis markers) is kept, and so is the
  cluster section that `bench/run --only cluster` writes (bench/cluster.exs).
  """
  def write_markdown(report, path, env) do
    cluster =
      with {:ok, old} <- File.read(path),
           [_, rest] <- String.split(old, @cluster_start, parts: 2),
           [section, _] <- String.split(rest, @cluster_end, parts: 2) do
        @cluster_start <> section <> @cluster_end <> "\n\n"
      else
        _ -> ""
      end

    analysis =
      with {:ok, old} <- File.read(path),
           [_, rest] <- String.split(old, @analysis_start, parts: 2),
           [section, _] <- String.split(rest, @analysis_end, parts: 2) do
        @analysis_start <> section <> @analysis_end
      else
        _ -> @analysis_start <> "\n\n(No analysis yet.)\n\n" <> @analysis_end
      end

    File.write!(path, markdown(report, env, cluster <> analysis))
  end

  defp markdown(report, env, analysis) do
    """
    # Benchmarks: Drab.Presence vs Phoenix.Presence

    Written by `#{env.command}` on #{env.date}; #{env.runtime}. Do not edit by
    hand, except the analysis section at the end, which `bench/run` keeps.

    ## Machine and versions

    | | |
    |---|---|
    #{Enum.map_join(env.machine, "\n", fn {k, v} -> "| #{k} | #{v} |" end)}

    #{env.phoenix_note}

    ## How it is measured

    * Sizes: 1k, 10k and 100k presences on one topic; 10k over 1k topics (10
      per topic; reads are of one of them); 1M on one topic, Drab.Presence
      alone; join storms of 1k, 5k and (Drab.Presence alone) 20k processes.
    * Every presence is a distinct live process; #{env.callers} caller processes
      make the `track`/`untrack` calls, as channel processes would. Each key is
      a distinct user (so users = connections). Metas are `%{online_at: ...}`.
    * Every run starts on fresh topics with freshly spawned processes, and is
      torn down (processes killed, the system back to zero presences) before the
      next. Every run checks its outcome (counts, `list/1`, and the subscriber's
      view rebuilt from the diffs, which must equal `list/1`), so a broken run
      reports an error, never a fast time.
    * Track and untrack at 1k and 10k are the median of #{env.small_runs} runs;
      larger sizes run once. Callers are spawned with a heap big enough for
      their share of the entries, so that no GC of the harness's own data is
      timed. Reads are the median of 11 calls (5 when a call takes over 50 ms)
      after a warm-up call, from a fresh process; calls under 100 µs are timed
      in batches of thousands and divided. The run starts with an unreported
      warm-up of both systems.
    * Time to the last diff is measured at a subscriber process, from the start
      of the workload to its receipt of the diff that completes its view.
      **Drab.Presence gathers a topic's changes for `diff_window` (default
      50 ms) and sends one diff per window (in parts of at most 2,000
      presences), so its times to the last diff include that window.**
      Phoenix.Presence sends one diff per operation, from the tracker (through
      one Task each).
    * Phoenix's `count_users/1` and `count_connections/1` are Drab 0.10.5's:
      `Enum.count(list(topic))` and the sum of `length(metas)` over `list(topic)`.
    * Memory (from 10k up; at 1k the rise is within the VM's own noise): the
      tracked processes are spawned before the baseline; the figure is the rise
      of `:erlang.memory(:total)` after a GC of every process, once all diffs
      are out, divided by N. It includes what tracking adds to the tracked
      processes (a monitor, or Phoenix's link), and leaves out the harness's
      coordinator and subscriber. For Drab.Presence the NIF's own (Rust) heap,
      outside the BEAM's allocators, is added from `stats().nif_heap_bytes`.
    * Join storm: N processes subscribe to one topic, then each tracks itself.
      Each keeps a view from the diffs it receives: a count of presences, and
      for one member in 100 also a digest of every `{key, phx_ref}`, so that
      the members' own work stays well below that of delivering the diffs. The
      time is until the last member's view holds all N, and every view is then
      checked against `list/1`.
    * Channel join storm (9; needs Phoenix on the code path): real Phoenix
      channels, the same channel module for every system, as the Phoenix
      guides write it: `join/3` sends itself `:after_join`, whose handler
      tracks the socket and pushes `presence_state` from `list/1`. Each
      client is a socket transport process of its own, driving
      `Phoenix.Socket`'s transport callbacks with the V2 JSON serializer
      phoenix.js speaks (no HTTP server: what cowboy's websocket process
      does, less the TCP send), so `presence_diff` broadcasts reach it
      through the channel fastlane, encoded once per broadcast. N clients
      join one topic at once (10 watcher channels, which list but do not
      track, joined first); the time is until the last frame that
      completed a client's view arrived, and every client's view, rebuilt
      afterwards from its frames as phoenix.js `Presence` builds it
      (`syncState`, `syncDiff`, pending diffs), must equal `list/1`
      (every key and meta). Then every client closes (its transport
      process ends, its channel with it), timed until every watcher's view
      is empty. Channels hibernate when idle (`hibernate_after: 0`) and
      transports collect garbage after a large frame, or 5k of them would
      keep their largest heaps. Drab.Presence runs with its default window
      (50 ms) and, at 1k, in a row of its own beside the same Phoenix
      figures, with `diff_window: 0` (at 5k, one diff per join from its one
      dispatcher would outlast the storms' 10-minute bound). The floor is what the channels' own
      `presence_state` pushes cost to encode with the socket's serializer,
      for any presence system: the encoding of the final listing (median)
      × (N + 1) ÷ 2, since the N pushes list 1 to N presences.
    * Scheduler: a process asks to wake at every millisecond (absolute timers)
      and records how late it wakes, during the 100k (and 1M) track and
      reads; `:erlang.system_monitor/2` meanwhile names every process that ran
      or garbage-collected for over 5 ms without yielding. #{env.idle_tick}
    * The BEAM floors table times, in the same run and with no presence
      system, what the workloads cannot avoid: processes exiting, a monitor,
      building a listed map, copying a diff into a subscriber.
    * Diff latency under churn: #{env.churn[:workers]} workers track, untrack and
      update at random, as fast as they can for #{env.churn[:seconds]} s, over
      #{env.churn[:owners]} live processes per topic on #{env.churn[:topics]} topics (two in
      three tracked at any time; tracks, untracks and updates a third each),
      with one subscriber process per topic. Each meta carries the time of
      its operation, and each removed ref is noted with the time of its
      removal, so every change delivered is timed from its operation to the
      subscriber's receipt of the diff holding it. A change undone before
      its diff went out (Drab.Presence coalesces) is never delivered, and not
      counted. At the end every
      subscriber's view must equal `list/1`. Phoenix.Presence's tracker is
      one GenServer, so its callers wait for it: its operations per second
      are what it sustains.
    * #{env.delivery}

    ## Results

    Lower is better everywhere. Drab.Presence runs on each backend: the NIF
    (the default) and the sidecar (`backend: :sidecar`). Phoenix ÷ Drab is how
    many times lower the NIF's figure is; sidecar ÷ NIF, what the sidecar costs
    over the NIF (for metrics where higher is better, the inverse).

    | Workload | Measure | N | Drab.Presence (NIF) | Drab.Presence (sidecar) | Phoenix.Presence | Phoenix ÷ Drab | sidecar ÷ NIF |
    |---|---|---|--:|--:|--:|--:|--:|
    #{table(rows(report))}

    #{errors(report)}

    ### Details

    | Workload | Measure | N | Drab.Presence (NIF) | Drab.Presence (sidecar) | Phoenix.Presence | Phoenix ÷ Drab | sidecar ÷ NIF |
    |---|---|---|--:|--:|--:|--:|--:|
    #{table(rows(report, @details))}

    ### Longest stalls while the ticker ran

    Processes that ran without yielding (`long_schedule`) or spent in one GC
    (`long_gc`) over 5 ms, from `:erlang.system_monitor/2`: what can make the
    ticker late. The three longest per phase.

    #{stall_rows(report)}

    ### BEAM floors on this machine

    The same run, with no presence system involved: what the BEAM itself
    takes for work the workloads cannot avoid.

    | What | N | |
    |---|--:|--:|
    #{table(floor_rows(report.floors))}

    ## Targets (from the issue)

    The issue's Phoenix figures were measured elsewhere; "Phoenix (here)" is
    this run, on this machine.

    | Target | N | Phoenix (issue) | Phoenix (here) | Drab.Presence | target | |
    |---|---|--:|--:|--:|--:|---|
    #{table(targets(report))}

    ## Latency of reads

    ![list/1, count_users/1 and count_connections/1 latency against N, log-log](latency.svg)

    #{analysis}
    """
  end

  defp churn?(size), do: String.starts_with?(size, "churn")

  defp stall_rows(%{stalls: []}), do: "(The ticker runs at 100k and 1M only; none in this run.)"

  defp stall_rows(%{stalls: stalls}) do
    Enum.map_join(stalls, "\n", fn {size, system, phase, descriptions} ->
      seen = if descriptions == [], do: "none over 5 ms", else: Enum.join(descriptions, "; ")
      "* #{size}, #{system_name(system)}, #{phase}: #{seen}"
    end)
  end

  defp system_name(:drab), do: "Drab.Presence"
  defp system_name(:sidecar), do: "Drab.Presence (sidecar)"
  defp system_name(:phoenix), do: "Phoenix.Presence"

  defp table(rows), do: Enum.map_join(rows, "\n", &("| " <> Enum.join(&1, " | ") <> " |"))

  defp errors(%{errors: []}), do: ""

  defp errors(%{errors: errors}) do
    "**Runs that failed** (no figure reported):\n\n" <>
      Enum.map_join(errors, "\n", fn {size, system, workload, message} ->
        "* #{workload}, #{size}, #{system}: #{message}"
      end)
  end

  # --- plot ------------------------------------------------------------------

  @doc """
  Draws list/1 and count latency against N, both systems, log-log, as SVG
  with gnuplot. Returns :ok, or {:skipped, reason}.
  """
  def plot(report, sizes, svg_path, tmp_dir) do
    series =
      for {metric, label} <- [
            list_us: "list/1",
            count_users_us: "count\\_users/1",
            count_connections_us: "count\\_connections/1"
          ],
          system <- @systems do
        points =
          for {label_n, n} <- sizes,
              v = get(report, label_n, metric, system),
              v != nil,
              do: {n, v}

        {"#{if system == :drab, do: "Drab.Presence", else: "Phoenix.Presence"} #{label}", points,
         system, metric}
      end
      |> Enum.reject(fn {_, points, _, _} -> points == [] end)

    gnuplot = System.find_executable("gnuplot")

    cond do
      gnuplot == nil ->
        {:skipped, "gnuplot not found"}

      series == [] ->
        {:skipped, "no read latencies"}

      true ->
        File.mkdir_p!(tmp_dir)
        data = Path.join(tmp_dir, "latency.dat")

        File.write!(
          data,
          Enum.map_join(series, "\n\n\n", fn {title, points, _, _} ->
            "# #{title}\n" <> Enum.map_join(points, "\n", fn {n, v} -> "#{n} #{v}" end)
          end) <> "\n"
        )

        plots =
          series
          |> Enum.with_index()
          |> Enum.map_join(", \\\n  ", fn {{title, _, system, metric}, i} ->
            dash = if system == :drab, do: 1, else: 2

            color =
              %{list_us: "#1f77b4", count_users_us: "#d62728", count_connections_us: "#2ca02c"}[
                metric
              ]

            "'#{data}' index #{i} using 1:2 with linespoints dt #{dash} lw 2 " <>
              "pt #{if system == :drab, do: 7, else: 5} lc rgb '#{color}' title '#{title}'"
          end)

        script = """
        set terminal svg size 900,600 dynamic font 'sans,12'
        set output '#{svg_path}'
        set logscale xy
        set format x '10^{%T}'
        set format y '10^{%T}'
        set xrange [600:1.6e6]
        set yrange [0.05:2e7]
        set xlabel 'presences on the topic (N)'
        set ylabel 'latency per call (µs)'
        set title 'Read latency against topic size (log-log; lower is better)'
        set key top left box opaque
        set grid
        plot #{plots}
        """

        script_path = Path.join(tmp_dir, "latency.gp")
        File.write!(script_path, script)

        case System.cmd(gnuplot, [script_path], stderr_to_stdout: true) do
          {_, 0} -> :ok
          {out, status} -> {:skipped, "gnuplot failed (#{status}): #{out}"}
        end
    end
  end
end
