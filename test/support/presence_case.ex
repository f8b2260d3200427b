defmodule Drab.PresenceCase do
  @moduledoc false
  # Each test gets its own topic and a supply of live processes to track.
  use ExUnit.CaseTemplate

  using do
    quote do
      import Drab.PresenceCase
    end
  end

  @doc """
  The backend every API suite runs on: `DRAB_PRESENCE_BACKEND` (`nif`, the
  default, or `sidecar`). Test presence modules pass it as `backend:`, and
  the test helper skips tests tagged `:nif_only` (NIF internals: scheduler
  holds, reloads, panics) on the sidecar. One set of tests, run once per
  backend by scripts/test.
  """
  @spec backend() :: :nif | :sidecar
  def backend do
    case System.get_env("DRAB_PRESENCE_BACKEND", "nif") do
      "nif" -> :nif
      "sidecar" -> :sidecar
      other -> raise ArgumentError, "DRAB_PRESENCE_BACKEND must be nif or sidecar, got: #{other}"
    end
  end

  @doc "The `Drab.Presence.Backend` module of `backend/0`."
  @spec backend_module() :: module()
  def backend_module do
    case backend() do
      :nif -> Drab.Presence.Backend.NIF
      :sidecar -> Drab.Presence.Backend.Sidecar
    end
  end

  setup context do
    {:ok, topic: "topic:#{inspect(context.module)}.#{context.test}"}
  end

  @doc "Puts `app`'s env `key` back as it was (or deletes it) when the test ends."
  @spec restore_env_on_exit(atom(), atom()) :: :ok
  def restore_env_on_exit(app, key) do
    previous = Application.fetch_env(app, key)

    ExUnit.Callbacks.on_exit(fn ->
      case previous do
        {:ok, value} -> Application.put_env(app, key, value)
        :error -> Application.delete_env(app, key)
      end
    end)
  end

  @doc "A live process that stays until the test ends (or is killed)."
  @spec live_pid() :: pid()
  def live_pid do
    pid = spawn(fn -> Process.sleep(:infinity) end)
    ExUnit.Callbacks.on_exit(fn -> Process.exit(pid, :kill) end)
    pid
  end

  @doc "A socket as Drab hands it to presence: topic, channel_pid and assigns."
  @spec socket(String.t(), map()) :: map()
  def socket(topic, assigns \\ %{}) do
    %{
      topic: topic,
      channel_pid: live_pid(),
      assigns: Map.merge(%{__client_id: "browser-#{System.unique_integer([:positive])}"}, assigns)
    }
  end

  @doc "Polls `fun` every 10 ms until it returns true; fails the test after `tries`."
  @spec wait_until((() -> boolean()), pos_integer()) :: :ok
  def wait_until(fun, tries \\ 500) do
    cond do
      fun.() -> :ok
      tries == 0 -> ExUnit.Assertions.flunk("condition never became true")
      true -> Process.sleep(10) && wait_until(fun, tries - 1)
    end
  end

  @doc """
  Asserts that every call of the presence `module` on `topic` raises its
  not-started `ArgumentError` and does nothing (an update function is never
  run), and that `fetchers_pids/0` is `[]`, as Phoenix's is without a
  tracker: what a module answers before its first start and after a stop.
  """
  @spec assert_not_started(module(), String.t()) :: :ok
  def assert_not_started(module, topic) do
    me = self()
    pid = live_pid()

    calls = [
      track: fn -> module.track(pid, topic, "k", %{}) end,
      untrack: fn -> module.untrack(pid, topic, "k") end,
      update: fn -> module.update(pid, topic, "k", %{a: 1}) end,
      update_fun: fn -> module.update(pid, topic, "k", fn _ -> send(me, :update_ran) end) end,
      list: fn -> module.list(topic) end,
      get_by_key: fn -> module.get_by_key(topic, "k") end,
      count_users: fn -> module.count_users(topic) end,
      count_connections: fn -> module.count_connections(topic) end,
      subscribe: fn -> module.subscribe(topic) end,
      unsubscribe: fn -> module.unsubscribe(topic) end,
      stats: fn -> module.stats() end
    ]

    for {name, call} <- calls do
      message =
        try do
          call.()
          ExUnit.Assertions.flunk("#{name} did not raise")
        rescue
          error in ArgumentError -> error.message
        end

      ExUnit.Assertions.assert(
        message =~ "#{inspect(module)} is not started",
        "#{name} raised another ArgumentError: #{message}"
      )
    end

    ExUnit.Assertions.refute_received(:update_ran)
    ExUnit.Assertions.assert(module.fetchers_pids() == [])
    :ok
  end

  @doc "Waits for the next presence_diff on `topic` and returns its payload."
  defmacro assert_diff(topic, timeout \\ 1_000) do
    quote do
      assert_receive %{event: "presence_diff", topic: ^unquote(topic), payload: payload},
                     unquote(timeout)

      payload
    end
  end

  @doc """
  Runs `script` in a new `elixir` OS process with only this app's ebin added
  to Elixir's own code path: no module of the suite is loaded there, and no
  atom it made exists. Returns `{output, exit_status}`, stderr included.
  Killed after `timeout_s` seconds where coreutils' `timeout` exists.
  """
  @spec run_clean_vm(Path.t(), [String.t()], pos_integer()) :: {String.t(), non_neg_integer()}
  def run_clean_vm(script, args \\ [], timeout_s \\ 60) do
    elixir = System.find_executable("elixir") || raise "elixir is not on the PATH"
    ebin = :drab_presence |> :code.lib_dir(:ebin) |> List.to_string()
    argv = ["-pa", ebin, script | args]

    case System.find_executable("timeout") do
      nil ->
        System.cmd(elixir, argv, stderr_to_stdout: true)

      timeout ->
        System.cmd(timeout, ["-k", "5", "#{timeout_s}", elixir | argv], stderr_to_stdout: true)
    end
  end

  @doc """
  Runs `measure` (returning `{gap, result}`) `n` times: the smallest gap,
  and the last result. A call that holds a scheduler does so every time; a
  shared machine's hiccup does not.
  """
  @spec best_of(pos_integer(), (() -> {number(), result})) :: {number(), result}
        when result: term()
  def best_of(n, measure) do
    Enum.reduce(1..n, {nil, nil}, fn _, {best, _} ->
      {gap, result} = measure.()
      {if(best, do: min(best, gap), else: gap), result}
    end)
  end

  @doc """
  Runs `fun` with one normal scheduler online and a high-priority ticker
  that wants to run every millisecond; returns `{worst_gap_us, fun_result}`,
  the longest gap between two ticks. A call that holds the scheduler shows
  as a gap as long as the hold.
  """
  @spec worst_tick_gap((() -> result)) :: {non_neg_integer(), result} when result: term()
  def worst_tick_gap(fun) do
    online = :erlang.system_flag(:schedulers_online, 1)

    try do
      ticker =
        spawn_link(fn ->
          Process.flag(:priority, :high)
          tick(System.monotonic_time(:microsecond), 0)
        end)

      Process.sleep(20)
      result = fun.()
      send(ticker, {:stop, self()})

      receive do
        {:worst_gap_us, gap} -> {gap, result}
      after
        5_000 -> ExUnit.Assertions.flunk("the ticker did not report")
      end
    after
      :erlang.system_flag(:schedulers_online, online)
    end
  end

  defp tick(last, worst) do
    receive do
      {:stop, from} -> send(from, {:worst_gap_us, worst})
    after
      1 ->
        now = System.monotonic_time(:microsecond)
        tick(now, max(worst, now - last))
    end
  end

  @doc """
  Applies a `presence_diff` payload to a view shaped like `list/1`, exactly as
  phoenix.js `Presence.syncDiff` does: a joined key gets the joined metas plus
  its current metas whose `phx_ref` is not among them; leaves remove metas by
  `phx_ref`, and a key with none left goes. Applying a diff twice is harmless.
  """
  @spec sync_diff(map(), %{joins: map(), leaves: map()}) :: map()
  def sync_diff(view, %{joins: joins, leaves: leaves}) do
    view =
      Enum.reduce(joins, view, fn {key, %{metas: joined} = presence}, view ->
        joined_refs = MapSet.new(joined, & &1.phx_ref)

        current =
          case view do
            %{^key => %{metas: metas}} -> Enum.reject(metas, &(&1.phx_ref in joined_refs))
            _ -> []
          end

        Map.put(view, key, %{presence | metas: current ++ joined})
      end)

    Enum.reduce(leaves, view, fn {key, %{metas: left}}, view ->
      case view do
        %{^key => %{metas: metas} = presence} ->
          left_refs = MapSet.new(left, & &1.phx_ref)

          case Enum.reject(metas, &(&1.phx_ref in left_refs)) do
            [] -> Map.delete(view, key)
            kept -> Map.put(view, key, %{presence | metas: kept})
          end

        _ ->
          view
      end
    end)
  end

  @doc "Metas of a listed or diffed presence map, without the refs, sorted."
  @spec bare(map()) :: %{String.t() => [map()]}
  def bare(presences) do
    Map.new(presences, fn {key, %{metas: metas}} ->
      {key, metas |> Enum.map(&Map.drop(&1, [:phx_ref, :phx_ref_prev])) |> Enum.sort()}
    end)
  end
end
