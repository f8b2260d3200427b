defmodule Bench.Failed do
  @moduledoc false
  # A run whose result check failed, or that timed out: it reports no figure.
  defexception [:message]
end

defmodule Bench.Harness do
  @moduledoc false
  # The small part of Benchee we need: timing, medians, warm-up, waiting,
  # checks, memory, and the processes a workload is made of (tracked
  # processes, callers, a ticker watching scheduler health). Times are
  # monotonic, in microseconds.

  @doc "Microseconds since `t0` (a `System.monotonic_time/0` value)."
  def since_us(t0),
    do: System.convert_time_unit(System.monotonic_time() - t0, :native, :microsecond)

  def now, do: System.monotonic_time()

  @doc "Median of a list of numbers."
  def median(values) do
    sorted = Enum.sort(values)
    n = length(sorted)

    if rem(n, 2) == 1,
      do: Enum.at(sorted, div(n, 2)),
      else: (Enum.at(sorted, div(n, 2) - 1) + Enum.at(sorted, div(n, 2))) / 2
  end

  @doc """
  Median µs per call of `fun` over 11 samples (5 when a call takes over
  50 ms), after a warm-up call. `check` is given every result and must
  return true. A call under 100 µs is timed in batches (calibrated so that a
  batch takes ~5 ms) and divided.
  """
  def sample(fun, opts) do
    check = Keyword.get(opts, :check, fn _ -> true end)
    {once_us, result} = :timer.tc(fun)
    checked!(result, check, opts[:what])
    # The fastest of a few calls: one slow call (a GC) must not make the
    # clock's resolution decide a sub-microsecond figure.
    once_us = Enum.min([once_us | for(_ <- 1..2, do: elem(:timer.tc(fun), 0))])
    runs = if once_us > 50_000, do: 5, else: 11
    batch = if once_us < 100, do: batch_size(fun), else: 1

    Enum.map(1..runs, fn _ ->
      {us, result} = :timer.tc(fn -> repeat(fun, batch) end)
      checked!(result, check, opts[:what])
      us / batch
    end)
    |> median()
  end

  defp batch_size(fun) do
    {us, _} = :timer.tc(fn -> repeat(fun, 1_000) end)
    max(1_000, round(1_000 * 5_000 / max(us, 1)))
  end

  # Calls `fun` n times; returns the last result.
  defp repeat(fun, 1), do: fun.()

  defp repeat(fun, n) do
    fun.()
    repeat(fun, n - 1)
  end

  defp checked!(result, check, what) do
    check.(result) || fail!("#{what || "result"} check failed, got #{short(result)}")
    result
  end

  @doc "Raises `Bench.Failed` unless `condition`."
  def check!(condition, message), do: condition || fail!(message)

  def fail!(message), do: raise(Bench.Failed, message)

  def short(term), do: inspect(term, limit: 5, printable_limit: 60)

  @doc "Polls `fun` every `every` ms until it returns a truthy value; raises after `timeout` ms."
  def wait_until(fun, what, timeout, every \\ 1) do
    deadline = System.monotonic_time(:millisecond) + timeout
    do_wait(fun, what, timeout, deadline, every)
  end

  defp do_wait(fun, what, timeout, deadline, every) do
    cond do
      result = fun.() ->
        result

      System.monotonic_time(:millisecond) > deadline ->
        fail!("timed out after #{timeout} ms waiting for #{what}")

      true ->
        Process.sleep(every)
        do_wait(fun, what, timeout, deadline, every)
    end
  end

  @doc """
  `:erlang.memory(:total)` after a garbage collection of every process, less
  the memory of `harness` processes (the coordinator and a subscriber, whose
  heaps hold the run's own data). The memory of processes that exited
  shortly before is freed with a delay, so it first waits for the VM to
  settle, and collects twice.
  """
  def gc_memory(harness) do
    settle()
    Process.sleep(100)

    for _ <- 1..2 do
      for pid <- Process.list(), do: :erlang.garbage_collect(pid)
    end

    total = :erlang.memory(:total)

    total -
      Enum.sum(for pid <- harness, {:memory, bytes} <- [Process.info(pid, :memory)], do: bytes)
  end

  @doc """
  Runs `fun` in a fresh process and returns its result (re-raising what it
  raised). Timed reads run so: the coordinator holds every entry of a run
  (up to 1M), and its GCs would otherwise land in the time of each read.
  """
  def isolated(role, fun) do
    {pid, ref} =
      spawn_monitor(fn ->
        Process.put(:bench_role, role)

        result =
          try do
            {:ok, fun.()}
          rescue
            exception -> {:raise, exception, __STACKTRACE__}
          end

        exit({:bench_result, result})
      end)

    receive do
      {:DOWN, ^ref, :process, ^pid, {:bench_result, {:ok, value}}} -> value
      {:DOWN, ^ref, :process, ^pid, {:bench_result, {:raise, e, trace}}} -> reraise e, trace
      {:DOWN, ^ref, :process, ^pid, reason} -> fail!("#{role} exited: #{short(reason)}")
    end
  end

  @doc "Waits until no scheduler has anything to run (the VM has settled)."
  def settle do
    wait_until(fn -> :erlang.statistics(:total_run_queue_lengths_all) == 0 end, "idle VM", 60_000)
  end

  # --- tracked processes -------------------------------------------------

  @doc """
  Spawns `n` live processes standing for channel processes, all linked to
  one herd process (spawned by it, so this process is linked to none of
  them). Killing the herd ends every one of them at once.
  """
  def spawn_herd(n, member \\ fn _i -> idle() end) do
    parent = self()

    herd =
      spawn(fn ->
        pids = for i <- 0..(n - 1), do: spawn_link(fn -> member.(i) end)
        send(parent, {:herd, self(), pids})
        receive do: (:never -> :ok)
      end)

    receive do
      {:herd, ^herd, pids} ->
        Process.put(:bench_herds, [herd | Process.get(:bench_herds, [])])
        {herd, pids}
    after
      120_000 -> fail!("spawning #{n} processes took over 120 s")
    end
  end

  defp idle, do: receive(do: (:never -> :ok))

  @doc "Kills a herd and waits until every member is gone."
  def kill_herd({herd, pids}) do
    Process.exit(herd, :kill)
    wait_until(fn -> not Enum.any?([herd | pids], &Process.alive?/1) end, "herd exit", 60_000, 10)
    Process.put(:bench_herds, List.delete(Process.get(:bench_herds, []), herd))
    :ok
  end

  @doc "Kills every herd still alive (after a failed run)."
  def kill_all_herds do
    for herd <- Process.get(:bench_herds, []), do: Process.exit(herd, :kill)
    Process.put(:bench_herds, [])
  end

  # --- callers -------------------------------------------------------------

  @doc """
  Spawns `callers` processes that will run `fun.(item)` for their share of
  `items` (as channel processes would call in), once started with
  `run_callers/1`. Each gets a heap big enough for its share and the garbage
  of its calls, so that no GC of the harness's own data (a caller holds up
  to 250k entries) lands in the measured time.
  """
  def prepare_callers(items, callers, fun) do
    parent = self()

    for chunk <- chunk(items, callers) do
      heap_words = :erts_debug.flat_size(chunk) + 100 * length(chunk)

      :erlang.spawn_opt(
        fn ->
          Process.put(:bench_role, "caller")
          receive do: (:go -> :ok)
          Enum.each(chunk, fun)
          send(parent, {:caller_done, self()})
        end,
        [:monitor, min_heap_size: heap_words]
      )
    end
  end

  @doc """
  Starts prepared callers at once; returns the µs from the start signal until
  every caller has returned. A caller that raises fails the run.
  """
  def run_callers(workers) do
    t0 = now()
    for {pid, _} <- workers, do: send(pid, :go)

    for {pid, ref} <- workers do
      receive do
        {:caller_done, ^pid} ->
          Process.demonitor(ref, [:flush])

        {:DOWN, ^ref, :process, ^pid, reason} ->
          fail!("a caller crashed: #{short(reason)}")
      after
        600_000 -> fail!("callers did not finish within 600 s")
      end
    end

    since_us(t0)
  end

  def run_callers(items, callers, fun), do: items |> prepare_callers(callers, fun) |> run_callers()

  defp chunk(items, n) do
    size = max(1, div(length(items) + n - 1, n))
    Enum.chunk_every(items, size)
  end

  # --- scheduler health -----------------------------------------------------

  @doc """
  Starts watching scheduler health: a high-priority ticker process asks to
  wake at every millisecond (an absolute timer per tick) and records how
  late it woke;
  meanwhile `:erlang.system_monitor/2` reports every process that ran
  without yielding (`long_schedule`) or spent in a GC (`long_gc`) over 5 ms,
  which is what can make a ticker late.
  """
  def start_watch do
    stalls = spawn(fn -> collect_stalls([]) end)
    :erlang.system_monitor(stalls, long_schedule: 5, long_gc: 5)
    # High priority: it runs as soon as a scheduler is free to run it, so
    # its lateness is the longest stretch a scheduler spent without
    # switching (a NIF, a BIF, a GC), not its wait behind busy processes.
    ticker =
      spawn(fn ->
        Process.flag(:priority, :high)
        tick(System.monotonic_time(:millisecond) + 1, [])
      end)

    {ticker, stalls}
  end

  @doc """
  Stops a watch. Returns the ticker's worst and 99th-percentile lateness in
  µs, and the longest stalls seen, described.
  """
  def stop_watch({ticker, stalls}) do
    :erlang.system_monitor(:undefined)
    late = sorted_reply(ticker, :ticks)
    events = sorted_reply(stalls, :stalls)
    n = length(late)

    %{
      worst_us: List.last(late, 0),
      p99_us: if(n > 0, do: Enum.at(late, min(n - 1, div(n * 99, 100))), else: 0),
      stalls: events |> Enum.reverse() |> Enum.take(3) |> Enum.map(&elem(&1, 1))
    }
  end

  defp sorted_reply(pid, what) do
    ref = Process.monitor(pid)
    send(pid, {:stop, self()})

    receive do
      {^what, ^pid, values} ->
        Process.demonitor(ref, [:flush])
        Enum.sort(values)

      {:DOWN, ^ref, _, _, reason} ->
        fail!("#{what} watcher died: #{short(reason)}")
    end
  end

  defp tick(deadline_ms, late) do
    timer = :erlang.start_timer(deadline_ms, self(), :tick, abs: true)

    receive do
      {:stop, from} ->
        :erlang.cancel_timer(timer)
        send(from, {:ticks, self(), late})

      {:timeout, ^timer, :tick} ->
        now_us = System.monotonic_time(:microsecond)
        tick(max(deadline_ms + 1, div(now_us, 1_000) + 1), [now_us - deadline_ms * 1_000 | late])
    end
  end

  defp collect_stalls(events) do
    receive do
      {:monitor, pid, kind, info} ->
        ms = info[:timeout]
        collect_stalls([{ms, "#{ms} ms #{kind}: #{describe(pid, kind, info)}"} | events])

      {:stop, from} ->
        send(from, {:stalls, self(), events})
    end
  end

  # A process is scheduled in and out at function calls; a long stretch
  # between two calls of Elixir code is a NIF or a BIF that did not yield.
  defp describe(pid, :long_schedule, info) do
    "#{role(pid)}, in at #{mfa(info[:in])}, out at #{mfa(info[:out])}"
  end

  defp describe(pid, :long_gc, info) do
    words = info[:heap_size] + info[:old_heap_size] + info[:mbuf_size]
    "#{role(pid)}, #{Float.round(words * 8 / 1_048_576, 1)} MB of heap"
  end

  # A port (the sidecar's) can run long too.
  defp role(port) when is_port(port) do
    case Port.info(port, :name) do
      {:name, name} -> "port #{name}"
      nil -> "a closed port"
    end
  end

  defp role(pid) do
    case Process.info(pid, [:registered_name, :dictionary]) do
      [registered_name: name, dictionary: _] when is_atom(name) and name != [] ->
        inspect(name)

      [registered_name: _, dictionary: dictionary] ->
        dictionary[:bench_role] || inspect(dictionary[:"$initial_call"] || pid)

      nil ->
        "an exited process"
    end
  end

  defp mfa({m, f, a}), do: Exception.format_mfa(m, f, a)
  defp mfa(other), do: inspect(other)

  # --- progress ------------------------------------------------------------

  def start_clock, do: Process.put(:bench_t0, now())

  def elapsed_s, do: since_us(Process.get(:bench_t0, now())) / 1_000_000

  @doc "Prints a progress line, prefixed with the seconds since the start."
  def progress(message) do
    IO.puts("[#{:io_lib.format("~6.1f", [elapsed_s()])}s] #{message}")
  end
end

defmodule Bench.Latency do
  @moduledoc false
  # A histogram of latencies in µs that many processes add to at once (an
  # `:atomics` array), for percentiles of millions of samples without
  # keeping them. Log-linear buckets: exact below 128 µs, then 64 buckets
  # per power of two, so a percentile is within 1.6% of the true value.

  import Bitwise

  @linear 128
  @per_octave 64
  @octaves 40

  def new, do: :atomics.new(@linear + @octaves * @per_octave, signed: false)

  @doc "Adds one latency of `us` microseconds."
  def add(histogram, us) when us >= 0, do: :atomics.add(histogram, bucket(us) + 1, 1)

  def count(histogram), do: Enum.sum(counts(histogram))

  @doc "The `p`th percentile (0 < p ≤ 100) in µs: the middle of its bucket; nil when empty."
  def percentile(histogram, p) do
    counts = counts(histogram)
    total = Enum.sum(counts)

    if total > 0 do
      rank = max(1, ceil(total * p / 100))

      counts
      |> Enum.with_index()
      |> Enum.reduce_while(0, fn {n, index}, seen ->
        if seen + n >= rank, do: {:halt, {:at, index}}, else: {:cont, seen + n}
      end)
      |> then(fn {:at, index} -> middle(index) end)
    end
  end

  defp counts(histogram) do
    for i <- 1..:atomics.info(histogram).size, do: :atomics.get(histogram, i)
  end

  defp bucket(us) when us < @linear, do: us
  defp bucket(us), do: bucket(us, 0)

  # Halve until the value is in 64..127: its top 7 bits, and the octave.
  defp bucket(v, octave) when v >= @linear, do: bucket(v >>> 1, octave + 1)

  defp bucket(v, octave),
    do:
      min(
        @linear + (octave - 1) * @per_octave + v - @per_octave,
        @linear + @octaves * @per_octave - 1
      )

  defp middle(index) when index < @linear, do: index

  defp middle(index) do
    octave = div(index - @linear, @per_octave) + 1
    low = (rem(index - @linear, @per_octave) + @per_octave) <<< octave
    low + ((1 <<< octave) - 1) / 2
  end
end
