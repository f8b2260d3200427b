# Drab.Presence against Phoenix.Presence: the workloads of the benchmark
# issue, at 1k, 10k and 100k presences on one topic, 10k over 1k topics, and
# 1M on one topic (ours alone), plus join storms, join and leave storms of
# real Phoenix channels, and diff latency under churn. Run it with
# `bench/run` (or `bench/run --quick` to skip the 100k, 1M, 20k and 5k
# channel sizes).
#
# Phoenix.Presence is compared when phoenix and phoenix_pubsub are on the
# code path (point ERL_LIBS at built copies); without them, Drab.Presence
# runs alone and the Phoenix column stays empty.
#
# Options: --quick, --out DIR (default: bench/ for a full run with Phoenix,
# bench/tmp/ otherwise, so that a partial run never replaces the committed
# results), --only churn (that workload alone, after a warm-up, printed to
# the console only), --only scheduler (the scheduler-health workloads:
# the ticker during 100k and 1M tracks, and during 4 concurrent listers of a
# 10k topic; console only), --only writes (track and untrack of 10k, 4 callers,
# --runs N rounds (9) taking the implementations in turn, so that a VM's
# drift hits them alike; median and range, console only), --only reads
# (list/1 at 10 a topic, 1k, 10k and 100k, as is and after one update,
# against the BEAM's floors for building the same map; console only),
# --only channels (the channel storms at 1k and 5k clients, 1k with
# --quick; console only), --churn-workers N (4), --churn-seconds S (5),
# --churn-owners N (live owner processes per topic, 1,000).

for file <- ~w(harness adapters subscribers workloads channels floors report) do
  Code.require_file("support/#{file}.exs", __DIR__)
end

defmodule Bench.Main do
  import Bench.Harness
  alias Bench.{Adapter, Channels, Report, Shape, Workloads}

  @k 1_000
  @small_runs 3
  @churn_topics 50
  @churn_owners 1_000

  def run(argv) do
    {opts, _, invalid} =
      OptionParser.parse(argv,
        strict: [
          quick: :boolean,
          out: :string,
          only: :string,
          runs: :integer,
          churn_workers: :integer,
          churn_seconds: :integer,
          churn_owners: :integer
        ]
      )

    invalid == [] || raise ArgumentError, "unknown options: #{inspect(invalid)}"

    opts[:only] in [nil, "churn", "writes", "scheduler", "reads", "channels"] ||
      raise ArgumentError, "--only takes: churn, writes, scheduler, reads, channels"

    quick? = Keyword.get(opts, :quick, false)

    churn = [
      topics: @churn_topics,
      workers: Keyword.get(opts, :churn_workers, Workloads.callers()),
      seconds: Keyword.get(opts, :churn_seconds, 5),
      owners: Keyword.get(opts, :churn_owners, @churn_owners)
    ]

    Process.put(:bench_role, "bench coordinator")
    start_clock()

    case opts[:only] do
      "churn" -> only_churn(churn)
      "writes" -> only_writes(Keyword.get(opts, :runs, 9))
      "scheduler" -> only_scheduler()
      "reads" -> only_reads()
      "channels" -> only_channels(quick?)
      nil -> run_all(argv, opts, quick?, churn)
    end
  end

  # The churn workload alone, after a warm-up, printed to the console only:
  # for profiling and targeted runs.
  defp only_churn(churn) do
    adapters = start_systems() |> adapters()
    warm_up(adapters)
    Report.print_header()
    report = run_churn(Report.new(), adapters, churn)
    if report.errors != [], do: System.halt(1)
  end

  # Track and untrack at 10k, round after round, the implementations in
  # turn: the issue's write targets, with the spread a noisy VM gives them.
  defp only_writes(runs) do
    adapters = start_systems() |> adapters()
    warm_up(adapters)
    shape = shape("10k", 10 * @k)

    results =
      for round <- 1..runs, adapter <- adapters do
        %{track_us: track, untrack_us: untrack} = Workloads.lifecycle(adapter, shape, runs: 1)

        progress(
          "  round #{round}/#{runs}, #{adapter.name()}: track #{Report.fmt(track)} µs, untrack #{Report.fmt(untrack)} µs per op"
        )

        {adapter, track, untrack}
      end

    IO.puts(
      "\n10k presences, #{Workloads.callers()} callers, µs per op: median (min-max) of #{runs} rounds"
    )

    for adapter <- adapters do
      tracks = for {^adapter, t, _} <- results, do: t
      untracks = for {^adapter, _, u} <- results, do: u
      IO.puts("  #{adapter.name()}: track #{spread(tracks)}; untrack #{spread(untracks)}")
    end
  end

  # The scheduler-health rows alone, console only: the ticker during 100k
  # tracks (each system), 1M tracks (ours), and 4 listers of a 10k topic.
  defp only_scheduler do
    adapters = start_systems() |> adapters()
    warm_up(adapters)
    Report.print_header()

    report =
      Enum.reduce(adapters, Report.new(), fn adapter, report ->
        guarded(report, "100k", adapter, "track with a ticker", fn ->
          Workloads.lifecycle(adapter, shape("100k", 100 * @k), runs: 1, ticker: true)
        end)
      end)

    report = run_listers(report, adapters)

    report =
      guarded(report, "1M", Adapter.Drab, "track with a ticker", fn ->
        Workloads.lifecycle(Adapter.Drab, shape("1M", 1_000 * @k), runs: 1, ticker: true)
      end)

    for label <- ["100k", "1M", listers_label()] do
      IO.puts("  #{label}:")
      Report.print_size(report, label)
    end

    if report.errors != [], do: System.halt(1)
  end

  # list/1 against the BEAM's floors for building the same map, in one
  # run, console only: 10 presences a topic (10k over 1k topics), then 1k,
  # 10k and 100k on one topic; each listed as is and after one update.
  defp only_reads do
    adapters = start_systems() |> adapters()
    warm_up(adapters)
    progress("BEAM floors (no presence system involved)")
    sizes = [@k, 10 * @k, 100 * @k]
    floors = Bench.Floors.run(@k, sizes, [])
    Report.print_floors(floors)
    Report.print_header()

    shapes = [
      %Shape{label: "10k / 1k topics", n: 10 * @k, topics: @k},
      shape("1k", @k),
      shape("10k", 10 * @k),
      shape("100k", 100 * @k)
    ]

    report =
      for shape <- shapes, adapter <- adapters, reduce: %{Report.new() | floors: floors} do
        report ->
          guarded(report, shape.label, adapter, "track/reads/untrack", fn ->
            Workloads.lifecycle(adapter, shape, runs: 1, memory: true)
          end)
      end

    for shape <- shapes do
      IO.puts("  #{shape.label}:")
      Report.print_size(report, shape.label)
    end

    IO.puts("\nlist/1 against the :maps.from_list/1 floor (issue 20: ≤ 2× at 10k, ≤ 3× at 100k):")

    for %Shape{topics: 1, n: n, label: label} <- shapes,
        {":maps.from_list" <> _, ^n, floor_us, _} <- floors,
        adapter <- adapters,
        list_us = Report.get(report, label, :list_us, system(adapter)),
        is_number(list_us) do
      IO.puts(
        "  #{label}, #{adapter.name()}: #{Report.fmt(list_us)} µs = " <>
          "#{Report.fmt(list_us / floor_us)}× the floor (#{Report.fmt(floor_us)} µs)"
      )
    end

    if report.errors != [], do: System.halt(1)
  end

  # The channel storms alone, console only.
  defp only_channels(quick?) do
    phoenix? = start_systems()

    if phoenix? and Channels.available?() do
      adapters = adapters(phoenix?)
      warm_up(adapters)
      report = run_channels(Report.new(), adapters, quick?)
      if report.errors != [], do: System.halt(1)
    else
      IO.puts(channels_skipped())
    end
  end

  defp channels_skipped do
    """

    *** The channel storms need Phoenix (phoenix, phoenix_pubsub, plug,
    *** telemetry, jason: a Phoenix app's libraries) on the code path: they
    *** are skipped. Point ERL_LIBS at built copies to run them.
    """
  end

  # {label, N, whether diff_window: 0 runs too}: at 5k it would send 25M
  # frames from one dispatcher, longer than the storms' 10 min bound.
  defp channel_sizes(quick?),
    do: [{"1k channels", @k, true}] ++ if(quick?, do: [], else: [{"5k channels", 5 * @k, false}])

  # Our default (diff_window: 50), the sidecar and Phoenix.Presence at each
  # size; diff_window: 0 at 1k, under a size of its own (beside the same
  # run's Phoenix figures, for the ratio).
  defp run_channels(report, adapters, quick?) do
    progress("channel storms: a warm-up of 200 (unreported)")
    for adapter <- [Adapter.Unwindowed | adapters], do: Channels.storm(adapter, 200)

    Enum.reduce(channel_sizes(quick?), report, fn {label, n, unwindowed?}, report ->
      unwindowed = "#{label}, diff_window: 0"
      runs = if unwindowed?, do: [Adapter.Unwindowed | adapters], else: adapters

      report =
        Enum.reduce(runs, report, fn adapter, report ->
          size = if adapter == Adapter.Unwindowed, do: unwindowed, else: label

          guarded(report, size, adapter, "channel join and leave storms", fn ->
            Channels.storm(adapter, n)
          end)
        end)

      {report, sizes} =
        if unwindowed?,
          do: {Report.copy(report, label, unwindowed, :phoenix), [label, unwindowed]},
          else: {report, [label]}

      for size <- sizes do
        IO.puts("  #{size}:")
        Report.print_size(report, size)
      end

      report
    end)
  end

  @listers 4
  @lister_ms 3_000

  defp listers_label, do: "10k, #{@listers} listers"

  defp run_listers(report, adapters) do
    label = listers_label()

    Enum.reduce(adapters, report, fn adapter, report ->
      guarded(report, label, adapter, "concurrent list/1", fn ->
        Workloads.concurrent_lists(adapter, shape(label, 10 * @k), @listers, @lister_ms)
      end)
    end)
  end

  defp spread(values) do
    sorted = Enum.sort(values)
    median = Enum.at(sorted, div(length(sorted), 2))
    "#{Report.fmt(median)} (#{Report.fmt(hd(sorted))}-#{Report.fmt(List.last(sorted))})"
  end

  defp run_all(argv, opts, quick?, churn) do
    # The VM's own floor, before any presence system runs.
    idle_tick = idle_tick()

    phoenix? = start_systems()
    adapters = adapters(phoenix?)

    out = opts[:out] || if(phoenix? and not quick?, do: __DIR__, else: Path.join(__DIR__, "tmp"))

    progress(
      "#{System.schedulers_online()} schedulers; " <>
        if(phoenix?,
          do: "comparing Drab.Presence and Phoenix.Presence",
          else: "Drab.Presence ALONE (Phoenix absent)"
        ) <> if(quick?, do: " (--quick)", else: "")
    )

    warm_up(adapters)

    progress(
      "idle 1 ms ticker: late by #{Report.fmt(idle_tick.worst_us / 1_000)} ms at worst, " <>
        "#{Report.fmt(idle_tick.p99_us / 1_000)} ms at the 99th percentile; stalls: " <>
        if(idle_tick.stalls == [], do: "none over 5 ms", else: Enum.join(idle_tick.stalls, "; "))
    )

    floors = floors(quick?)

    one_topic =
      [shape("1k", @k), shape("10k", 10 * @k)] ++
        if(quick?, do: [], else: [shape("100k", 100 * @k)])

    spread =
      [%Shape{label: "10k / 1k topics", n: 10 * @k, topics: @k}] ++
        if(quick?,
          do: [],
          else: [%Shape{label: "100k / 100k topics", n: 100 * @k, topics: 100 * @k}]
        )

    alone = if quick?, do: [], else: [shape("1M", 1_000 * @k)]

    report = %{Report.new() | floors: floors, idle: idle_tick}
    Report.print_header()

    report =
      Enum.reduce(one_topic ++ spread, report, fn shape, report ->
        run_shape(report, adapters, shape)
      end)

    report = Enum.reduce(alone, report, &run_shape(&2, [Adapter.Drab], &1))
    report = run_listers(report, adapters)
    IO.puts("  #{listers_label()}:")
    Report.print_size(report, listers_label())

    storms =
      [{"1k subscribers", @k, adapters}, {"5k subscribers", 5 * @k, adapters}] ++
        if(quick?, do: [], else: [{"20k subscribers", 20 * @k, [Adapter.Drab]}])

    report = Enum.reduce(storms, report, fn storm, report -> run_storm(report, storm) end)

    report =
      if phoenix? and Channels.available?() do
        run_channels(report, adapters, quick?)
      else
        IO.puts(channels_skipped())
        report
      end

    report = run_churn(report, adapters, churn)

    write_outputs(report, out, %{
      phoenix?: phoenix?,
      quick?: quick?,
      argv: argv,
      idle_tick: idle_tick,
      churn: churn,
      sizes: for(s <- one_topic ++ alone, do: {s.label, s.n})
    })

    if report.errors != [] do
      progress("#{length(report.errors)} run(s) failed; see above")
      System.halt(1)
    end
  end

  defp shape(label, n), do: %Shape{label: label, n: n}

  defp adapters(true = _phoenix?), do: [Adapter.Drab, Adapter.Sidecar, Adapter.Phoenix]
  defp adapters(false), do: [Adapter.Drab, Adapter.Sidecar]

  # Phoenix.PubSub and both presence modules, when Phoenix is loadable.
  defp start_systems do
    phoenix? = Code.ensure_loaded?(Phoenix.Presence) and Code.ensure_loaded?(Phoenix.PubSub)

    if phoenix? do
      {:ok, _} = Application.ensure_all_started(:phoenix_pubsub)

      {:ok, _} =
        Supervisor.start_link([{Phoenix.PubSub, name: Bench.PubSub}], strategy: :one_for_one)

      :ok = Adapter.Drab.start(Bench.PubSub)
      :ok = Adapter.Unwindowed.start(Bench.PubSub)
      :ok = Adapter.Sidecar.start(Bench.PubSub)
      :ok = Adapter.Phoenix.start(Bench.PubSub)
      if Channels.available?(), do: :ok = Channels.start()
    else
      IO.puts("""

      *** Phoenix is not on the code path: Phoenix.PubSub / Phoenix.Presence are
      *** absent, so Drab.Presence runs ALONE and there is nothing to compare it
      *** with. Point ERL_LIBS at built phoenix and phoenix_pubsub to compare.
      """)

      :ok = Adapter.Drab.start(nil)
      :ok = Adapter.Sidecar.start(nil)
    end

    phoenix?
  end

  defp warm_up(adapters) do
    progress("warm-up (unreported)")
    for adapter <- adapters, do: Workloads.lifecycle(adapter, shape("warm-up", @k), runs: 2)
  end

  defp floors(quick?) do
    progress("BEAM floors (no presence system involved)")
    big = if quick?, do: 10 * @k, else: 100 * @k

    floors =
      Bench.Floors.run(big, [@k, 10 * @k] ++ if(quick?, do: [], else: [big]), [
        @k,
        5 * @k,
        20 * @k
      ])

    Report.print_floors(floors)
    floors
  end

  # The ticker with nothing else running, over as long as a 100k reads.
  defp idle_tick do
    settle()
    watch = start_watch()
    Process.sleep(3_000)
    stop_watch(watch)
  end

  defp run_shape(report, adapters, %Shape{} = shape) do
    big? = shape.n >= 100 * @k and shape.topics == 1
    runs = if big?, do: 1, else: @small_runs

    report =
      Enum.reduce(adapters, report, fn adapter, report ->
        report
        |> guarded(shape.label, adapter, "track/reads/untrack", fn ->
          # At 1k the rise in memory is within the noise of the VM's own.
          Workloads.lifecycle(adapter, shape, runs: runs, ticker: big?, memory: shape.n >= 10 * @k)
        end)
        |> guarded(shape.label, adapter, "mass disconnect", fn ->
          Workloads.mass_disconnect(adapter, shape)
        end)
      end)

    IO.puts("  #{shape.label}:")
    Report.print_size(report, shape.label)
    report
  end

  defp run_churn(report, adapters, churn) do
    label = churn_label(churn)

    report =
      Enum.reduce(adapters, report, fn adapter, report ->
        guarded(report, label, adapter, "diff latency under churn", fn ->
          Workloads.churn(adapter, churn)
        end)
      end)

    IO.puts("  diff latency under #{label}:")
    Report.print_size(report, label)
    report
  end

  defp churn_label(churn), do: "churn, #{churn[:topics]} topics, #{churn[:workers]} workers"

  defp run_storm(report, {label, n, adapters}) do
    report =
      Enum.reduce(adapters, report, fn adapter, report ->
        # Every member must learn of every other: N² presences delivered,
        # as N² one-join diffs (Phoenix) or N diffs of ~N joins each (ours).
        guarded(report, label, adapter, "join storm", fn ->
          Workloads.join_storm(adapter, n, 600_000)
        end)
      end)

    IO.puts("  join storm, #{label}:")
    Report.print_size(report, label)
    report
  end

  # Runs one workload; a failed check, a timeout or a crash is reported as
  # an error for that cell, and the run goes on from a clean state.
  defp guarded(report, size, adapter, workload, fun) do
    system = system(adapter)
    progress("#{size} #{adapter.name()}: #{workload}")

    try do
      figures = fun.()
      Report.put(report, size, system, figures)
    rescue
      exception -> failed(report, size, adapter, workload, Exception.message(exception))
    catch
      kind, reason -> failed(report, size, adapter, workload, Exception.format(kind, reason))
    end
  end

  defp failed(report, size, adapter, workload, message) do
    progress("FAILED #{size} #{adapter.name()} #{workload}: #{message}")
    kill_all_herds()
    Report.error(report, size, adapter.name(), workload, message)
  end

  defp system(Adapter.Drab), do: :drab
  defp system(Adapter.Unwindowed), do: :drab
  defp system(Adapter.Phoenix), do: :phoenix
  defp system(Adapter.Sidecar), do: :sidecar

  defp write_outputs(report, out, run) do
    File.mkdir_p!(out)
    tmp = Path.join(__DIR__, "tmp")
    svg = Path.join(out, "latency.svg")
    md = Path.join(out, "RESULTS.md")

    case Report.plot(report, run.sizes, svg, tmp) do
      :ok -> progress("wrote #{Path.relative_to_cwd(svg)}")
      {:skipped, reason} -> progress("no plot: #{reason}")
    end

    Report.write_markdown(report, md, environment(run))
    progress("wrote #{Path.relative_to_cwd(md)}")
  end

  defp environment(run) do
    phoenix_vsn = fn app ->
      case Application.load(app) do
        result when result in [:ok, {:error, {:already_loaded, app}}] ->
          to_string(Application.spec(app, :vsn))

        _ ->
          "absent"
      end
    end

    mem_kb =
      case Regex.run(~r/MemTotal:\s+(\d+) kB/, File.read!("/proc/meminfo")) do
        [_, kb] -> String.to_integer(kb)
        nil -> 0
      end

    cpu =
      case Regex.run(~r/model name\s*:\s*(.+)/, File.read!("/proc/cpuinfo")) do
        [_, model] -> model
        nil -> "unknown"
      end

    %{
      command: Enum.join(["bench/run" | run.argv], " "),
      date: Calendar.strftime(DateTime.utc_now(), "%Y-%m-%d %H:%M UTC"),
      runtime: "the whole run took #{round(elapsed_s())} s",
      callers: Workloads.callers(),
      small_runs: @small_runs,
      churn: run.churn,
      idle_tick:
        "With nothing running (3 s), it was late by " <>
          "#{Report.fmt(run.idle_tick.worst_us / 1_000)} ms at worst and " <>
          "#{Report.fmt(run.idle_tick.p99_us / 1_000)} ms at the 99th percentile.",
      delivery:
        if(run.phoenix?,
          do:
            "Both systems deliver diffs through the same `Phoenix.PubSub` server " <>
              "(Drab.Presence with `pubsub_server:`, as in a Phoenix app). Subscribers " <>
              "are plain processes, so every diff is copied into each of them (a " <>
              "channel subscribes with a fastlane instead, and is sent the diff " <>
              "encoded once).",
          else:
            "Drab.Presence delivers diffs through its built-in registry. Subscribers " <>
              "are plain processes, so every diff is copied into each of them."
        ),
      phoenix_note:
        if(run.phoenix?,
          do: "",
          else: "**Phoenix was not on the code path: Drab.Presence ran alone.**"
        ),
      machine: [
        {"CPU", "#{cpu}, nproc #{:erlang.system_info(:logical_processors_available)}"},
        {"schedulers", "#{System.schedulers_online()} online"},
        {"memory", "#{Float.round(mem_kb / 1_048_576, 1)} GiB"},
        {"OS", os()},
        {"Elixir", System.version()},
        {"Erlang/OTP",
         "#{:erlang.system_info(:otp_release)} (erts #{:erlang.system_info(:version)})"},
        {"rustc", command(["rustc", "--version"])},
        {"phoenix", phoenix_vsn.(:phoenix)},
        {"phoenix_pubsub", phoenix_vsn.(:phoenix_pubsub)},
        {"drab_presence", "#{Application.spec(:drab_presence, :vsn)} (#{revision()})"}
      ]
    }
  end

  # The commit the library was built from, and whether its code differed.
  defp revision do
    commit = command(["git", "rev-parse", "--short", "HEAD"])

    case command(["git", "status", "--porcelain", "--", "elixir", "native", "mix.exs"]) do
      "" -> "commit #{commit}"
      "unknown" -> "commit #{commit}"
      _changed -> "commit #{commit}, with uncommitted changes to elixir/ or native/"
    end
  end

  defp os do
    case File.read("/etc/os-release") do
      {:ok, text} ->
        case Regex.run(~r/PRETTY_NAME="([^"]+)"/, text) do
          [_, name] -> name
          nil -> "unknown"
        end

      _ ->
        "unknown"
    end
  end

  defp command([cmd | args]) do
    with path when path != nil <- System.find_executable(cmd),
         {out, 0} <- System.cmd(path, args, stderr_to_stdout: true) do
      String.trim(out)
    else
      _ -> "unknown"
    end
  end
end

Bench.Main.run(System.argv())
