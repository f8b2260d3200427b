defmodule Drab.Presence.StopTest do
  # A stopped presence module: every call raises the error it raises before
  # its first start (a write taken then would never be announced), and the
  # table keeps its presences for the next start. Runs once per backend.
  # Not async: it asserts that stopping logs no error, and capture_log sees
  # every process's log, such as another test's crashing process.
  use Drab.PresenceCase, async: false

  import ExUnit.CaptureLog

  require Logger

  defmodule Stopping do
    use Drab.Presence,
      otp_app: :drab_presence,
      backend: Drab.PresenceCase.backend(),
      diff_window: 10
  end

  @pubsub __MODULE__.PubSub
  @compile {:no_warn_undefined, [Phoenix.PubSub, Phoenix.PubSub.PG2]}

  defmodule OnPubSub do
    use Drab.Presence,
      otp_app: :drab_presence,
      backend: Drab.PresenceCase.backend(),
      pubsub_server: Drab.Presence.StopTest.PubSub,
      diff_window: 10
  end

  test "after a stop every call raises; the next start has every presence", %{topic: topic} do
    start_supervised!(Stopping)
    stays = live_pid()
    leaves = live_pid()
    {:ok, _} = Stopping.track(stays, topic, "stays", %{a: 1})
    {:ok, _} = Stopping.update(stays, topic, "stays", %{a: 2})
    {:ok, _} = Stopping.track(leaves, topic, "leaves", %{})
    stop_supervised!(Stopping)

    assert_not_started(Stopping, topic)

    # A process that exits while the module is stopped still leaves.
    Process.exit(leaves, :kill)

    start_supervised!(Stopping)
    wait_until(fn -> Stopping.count_connections(topic) == 1 end)
    assert %{"stays" => %{metas: [%{a: 2}]}} = Stopping.list(topic)
    assert {Stopping.count_users(topic), Stopping.count_connections(topic)} == {1, 1}

    # And it works as before: writes, and their diffs.
    subscriber = subscriber(Stopping, topic)
    {:ok, _} = Stopping.track(live_pid(), topic, "new", %{})
    assert_receive {:diff, ^subscriber, %{joins: %{"new" => _}}}, 1_000
  end

  @tag :capture_log
  test "a killed supervisor: calls raise as after a stop", %{topic: topic} do
    {:ok, supervisor} = Stopping.start_link()
    Process.unlink(supervisor)
    {:ok, _} = Stopping.track(live_pid(), topic, "u", %{})

    # Its children get the kill a moment later, and log it: all of it
    # before the next test, which looks at the log.
    refs = for pid <- [supervisor | descendants(supervisor)], do: Process.monitor(pid)
    Process.exit(supervisor, :kill)
    for ref <- refs, do: assert_receive({:DOWN, ^ref, _, _, _})
    Logger.flush()

    assert_not_started(Stopping, topic)

    start_supervised!(Stopping)
    assert Map.keys(Stopping.list(topic)) == ["u"]
  end

  defp descendants(supervisor) do
    Enum.flat_map(Supervisor.which_children(supervisor), fn
      {_id, pid, :supervisor, _} when is_pid(pid) -> [pid | descendants(pid)]
      {_id, pid, _worker, _} when is_pid(pid) -> [pid]
      _restarting -> []
    end)
  end

  # A Drab or Phoenix app stops its children in reverse order. A channel
  # that traps exits and untracks in terminate/2 finds the presence module
  # running when the module is listed before the endpoint, and stopped when
  # it is listed after (Drab's README order); either way the tree stops
  # cleanly, and the presences leave with their processes.
  for {order, untracked} <- [presence_first: :ok, presence_last: :not_started] do
    test "an app's tree stopped with the presence module listed #{order}", %{topic: topic} do
      children =
        if unquote(order) == :presence_first,
          do: [Stopping, endpoint()],
          else: [endpoint(), Stopping]

      log =
        capture_log(fn ->
          assert run_app(children, Stopping, topic) == List.duplicate(unquote(untracked), 3)
        end)

      refute log =~ "[error]"

      assert_not_started(Stopping, topic)
      start_supervised!(Stopping)
      wait_until(fn -> Stopping.count_connections(topic) == 0 end)
      assert Stopping.list(topic) == %{}
    end
  end

  describe "with Phoenix.PubSub" do
    @describetag :phoenix

    setup do
      {:ok, _} = Application.ensure_all_started(:phoenix_pubsub)
      :ok
    end

    test "Phoenix's order, PubSub, presence module, endpoint: a clean stop", %{topic: topic} do
      log =
        capture_log(fn ->
          children = [pubsub(), OnPubSub, endpoint()]
          assert run_app(children, OnPubSub, topic) == [:ok, :ok, :ok]
        end)

      refute log =~ "[error]"
    end

    test "listed before its PubSub: no start in cluster mode; with cluster: false, a stop " <>
           "that logs the diffs it could not broadcast",
         %{topic: topic} do
      Process.flag(:trap_exit, true)

      assert {:error, reason} = Supervisor.start_link([OnPubSub, pubsub()], strategy: :one_for_one)
      # Its cluster process cannot subscribe ("unknown registry" on pubsub
      # 2.x, a missing ETS table on 1.x).
      assert inspect(reason) =~ "failed_to_start_child, Drab.Presence.Cluster"

      log =
        capture_log(fn ->
          {:ok, app} =
            Supervisor.start_link([{OnPubSub, cluster: false}, pubsub()], strategy: :one_for_one)

          pid = live_pid()
          {:ok, _} = OnPubSub.track(pid, topic, "u", %{})
          wait_until(fn -> diffs_out?(OnPubSub) end)
          # As the tree stops: the PubSub first, then a channel leaves.
          {id, _, _, _} = pubsub_child(app)
          :ok = Supervisor.terminate_child(app, id)
          Process.exit(pid, :kill)
          wait_until(fn -> OnPubSub.count_connections(topic) == 0 and diffs_out?(OnPubSub) end)

          assert Supervisor.stop(app) == :ok
        end)

      assert log =~ "OnPubSub dropped a presence_diff on #{inspect(topic)} (0 joins, 1 leaves)"
    end
  end

  defp endpoint do
    %{
      id: :endpoint,
      type: :supervisor,
      start: {Supervisor, :start_link, [[], [strategy: :one_for_one]]}
    }
  end

  # phoenix_pubsub 2.x is a supervisor itself; 1.x (Phoenix 1.4, as Drab
  # 0.10 pins it) starts one of its adapters.
  defp pubsub do
    if function_exported?(Phoenix.PubSub, :child_spec, 1),
      do: {Phoenix.PubSub, name: @pubsub},
      else: {Phoenix.PubSub.PG2, name: @pubsub}
  end

  defp diffs_out?(module) do
    %{pending_topics: pending, queued_parts: queued} = module.stats()
    pending + queued == 0
  end

  defp pubsub_child(app) do
    Enum.find(Supervisor.which_children(app), fn {id, _, _, _} -> id != OnPubSub end)
  end

  # Starts `children` as an app would, three channels on `module` once the
  # tree is up, then stops the tree: what each channel's untrack in
  # terminate/2 returned.
  defp run_app(children, module, topic) do
    {:ok, app} = Supervisor.start_link(children, strategy: :one_for_one)
    Process.unlink(app)
    {:endpoint, endpoint, _, _} = List.keyfind(Supervisor.which_children(app), :endpoint, 0)

    for i <- 1..3 do
      channel = {__MODULE__.Channel, {self(), module, topic, i}}
      {:ok, _} = Supervisor.start_child(endpoint, Supervisor.child_spec(channel, id: i))
    end

    assert module.count_connections(topic) == 3
    assert Supervisor.stop(app) == :ok

    for i <- 1..3 do
      assert_received {:untracked, ^i, result}
      result
    end
  end

  defmodule Channel do
    # A channel process: tracked on join, and untracking in terminate/2,
    # which it reports to the test.
    use GenServer, restart: :transient

    def start_link(args), do: GenServer.start_link(__MODULE__, args)

    @impl true
    def init({_test, module, topic, i} = state) do
      Process.flag(:trap_exit, true)
      {:ok, _} = module.track(self(), topic, "user#{i}", %{})
      {:ok, state}
    end

    @impl true
    def terminate(_reason, {test, module, topic, i}) do
      result =
        try do
          module.untrack(self(), topic, "user#{i}")
        rescue
          error in ArgumentError ->
            if error.message =~ "is not started",
              do: :not_started,
              else: reraise(error, __STACKTRACE__)
        end

      send(test, {:untracked, i, result})
    end
  end

  # Subscribed in a process of its own: the built-in registry ends its
  # subscribers when the module stops. Forwards each diff to the test.
  defp subscriber(module, topic) do
    test = self()

    pid =
      spawn(fn ->
        :ok = module.subscribe(topic)
        send(test, {:subscribed, self()})
        forward_diffs(test, topic)
      end)

    assert_receive {:subscribed, ^pid}
    pid
  end

  defp forward_diffs(test, topic) do
    receive do
      %{event: "presence_diff", topic: ^topic, payload: payload} ->
        send(test, {:diff, self(), payload})
        forward_diffs(test, topic)
    end
  end
end
