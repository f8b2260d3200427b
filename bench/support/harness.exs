defmodule Bench.Failed do
  @moduledoc false
  # A run whose result check failed, or that timed out: it reports no figure.
  defexception [:message]
end

defmodule Bench.Harness do
  @moduledoc false
  # The small part of Benchee we need: timing, medians, warm-up, waiting,
  # checks, and the processes a workload is made of (tracked processes,
  # callers, a ticker). Times are monotonic, in microseconds.

  @doc "Microseconds since `t0` (a `System.monotonic_time/0` value)."
  def since_us(t0), do: System.convert_time_unit(System.monotonic_time() - t0, :native, :microsecond)

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
  Median µs per call of `fun`, after `warmup` untimed calls. `check` is given
  every result and must return true. A call too fast for the clock is timed
  in batches (calibrated so one batch takes ~5 ms) and divided.
  """
  def sample(fun, opts) do
    runs = Keyword.fetch!(opts, :runs)
    check = Keyword.get(opts, :check, fn _ -> true end)

    for _ <- 1..Keyword.get(opts, :warmup, 1), do: checked!(fun.(), check, opts[:what])
    {once_us, _} = :timer.tc(fun)
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

  @doc "Garbage-collects every process, then returns `:erlang.memory(:total)`."
  def gc_memory do
    for pid <- Process.list(), do: :erlang.garbage_collect(pid)
    :erlang.memory(:total)
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
  Runs `fun.(item)` for every item, from `callers` processes at once (as
  channel processes would call in), and returns the µs from the start signal
  until every caller has returned. A caller that raises fails the run.
  """
  def run_callers(items, callers, fun) do
    chunks = chunk(items, callers)
    parent = self()

    workers =
      for chunk <- chunks do
        spawn_monitor(fn ->
          receive do: (:go -> :ok)
          Enum.each(chunk, fun)
          send(parent, {:caller_done, self()})
        end)
      end

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

  defp chunk(items, n) do
    size = max(1, div(length(items) + n - 1, n))
    Enum.chunk_every(items, size)
  end

  # --- scheduler health -----------------------------------------------------

  @doc "Starts a process that wakes every 1 ms and remembers its worst lateness."
  def start_ticker do
    spawn(fn -> tick(now(), 0) end)
  end

  @doc "Stops a ticker; returns its worst delay beyond the 1 ms period, in µs."
  def stop_ticker(ticker) do
    ref = Process.monitor(ticker)
    send(ticker, {:stop, self()})

    receive do
      {:worst_gap, ^ticker, gap_us} ->
        Process.demonitor(ref, [:flush])
        max(gap_us - 1_000, 0)

      {:DOWN, ^ref, _, _, reason} ->
        fail!("ticker died: #{short(reason)}")
    end
  end

  defp tick(last, worst) do
    receive do
      {:stop, from} -> send(from, {:worst_gap, self(), worst})
    after
      1 ->
        t = now()
        tick(t, max(worst, since_us(last) - since_us(t)))
    end
  end

  # --- progress ------------------------------------------------------------

  def start_clock, do: Process.put(:bench_t0, now())

  def elapsed_s, do: since_us(Process.get(:bench_t0, now())) / 1_000_000

  @doc "Prints a progress line, prefixed with the seconds since the start."
  def progress(message) do
    IO.puts("[#{:io_lib.format("~6.1f", [elapsed_s()])}s] #{message}")
  end
end
