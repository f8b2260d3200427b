defmodule Drab.Presence.OwnModuleTest do
  use Drab.PresenceCase, async: true

  defmodule WithExtras do
    use Drab.Presence,
      otp_app: :drab_presence,
      backend: Drab.PresenceCase.backend(),
      diff_window: 10

    @impl true
    def fetch(topic, presences) do
      if observer = Process.whereis(observer(topic)),
        do: send(observer, {:fetched, map_size(presences)})

      for {key, %{metas: metas}} <- presences, into: %{} do
        {key, %{metas: metas, extra: "extra:#{key}"}}
      end
    end

    def observer(topic), do: :"observer:#{topic}"

    @impl true
    def start(socket, topic) do
      track(socket.channel_pid, topic, "custom:" <> socket.assigns.__client_id, %{custom: true})
    end
  end

  setup_all do
    start_supervised!(WithExtras)
    :ok
  end

  setup %{topic: topic} do
    Process.register(self(), WithExtras.observer(topic))
    :ok
  end

  test "list/1 and get_by_key/2 go through fetch/2, once per call", %{topic: topic} do
    {:ok, _} = WithExtras.track(live_pid(), topic, "u1", %{name: "u1"})
    {:ok, _} = WithExtras.track(live_pid(), topic, "u2", %{name: "u2"})

    assert %{"u1" => %{extra: "extra:u1", metas: [%{name: "u1"}]}, "u2" => %{extra: "extra:u2"}} =
             WithExtras.list(topic)

    assert_received {:fetched, 2}
    refute_received {:fetched, _}

    assert %{extra: "extra:u1", metas: [%{name: "u1"}]} = WithExtras.get_by_key(topic, "u1")
    assert_received {:fetched, 1}
    assert WithExtras.get_by_key(topic, "nobody") == []
  end

  test "diffs go through fetch/2, joins and leaves separately", %{topic: topic} do
    :ok = WithExtras.subscribe(topic)
    pid = live_pid()
    {:ok, _} = WithExtras.track(pid, topic, "u1", %{})
    assert %{joins: %{"u1" => %{extra: "extra:u1"}}, leaves: %{}} = assert_diff(topic)
    assert_received {:fetched, 1}
    assert_received {:fetched, 0}

    Process.exit(pid, :kill)
    assert %{joins: %{}, leaves: %{"u1" => %{extra: "extra:u1"}}} = assert_diff(topic)
  end

  test "its own start/2 overrides the default", %{topic: topic} do
    socket = socket(topic, %{__client_id: "b1"})
    {:ok, _} = WithExtras.start(socket, topic)
    assert Map.keys(WithExtras.list(topic)) == ["custom:b1"]
  end

  test "counts are the module's own", %{topic: topic} do
    {:ok, _} = WithExtras.track(live_pid(), topic, "u1", %{})
    assert WithExtras.count_users(topic) == 1
    assert Drab.Presence.count_users(topic) == 0
  end

  test "child_spec/1 is a supervisor spec that passes options on" do
    assert %{
             id: WithExtras,
             type: :supervisor,
             start: {WithExtras, :start_link, [[diff_window: 5]]}
           } = WithExtras.child_spec(diff_window: 5)
  end
end

defmodule Drab.Presence.RestartTest do
  use Drab.PresenceCase, async: true

  defmodule Restarting do
    use Drab.Presence,
      otp_app: :drab_presence,
      backend: Drab.PresenceCase.backend(),
      diff_window: 10
  end

  test "a killed dispatcher loses no presence and sends what was pending", %{topic: topic} do
    start_supervised!(Restarting)
    :ok = Restarting.subscribe(topic)
    pids = for _ <- 1..50, do: live_pid()
    for pid <- pids, do: {:ok, _} = Restarting.track(pid, topic, inspect(pid), %{})

    dispatcher = Process.whereis(Restarting.Dispatcher)
    Process.exit(dispatcher, :kill)

    # The joins were pending when the dispatcher died: its successor sends them.
    payload = assert_diff(topic)

    assert map_size(payload.joins) + (collect(topic) |> Enum.map(&map_size(&1.joins)) |> Enum.sum()) ==
             50

    assert Process.whereis(Restarting.Dispatcher) != dispatcher
    assert Restarting.count_connections(topic) == 50

    Process.exit(hd(pids), :kill)
    assert %{leaves: leaves} = assert_diff(topic)
    assert map_size(leaves) == 1
    assert Restarting.count_connections(topic) == 49
  end

  defp collect(topic) do
    receive do
      %{event: "presence_diff", topic: ^topic, payload: payload} -> [payload | collect(topic)]
    after
      100 -> []
    end
  end
end
