defmodule Drab.Presence.CallbacksTest do
  # Phoenix 1.7's init/1, handle_metas/4 and fetchers_pids/0 on `use
  # Drab.Presence` modules.
  use Drab.PresenceCase, async: true

  import ExUnit.CaptureLog

  defmodule Metas do
    use Drab.Presence, otp_app: :drab_presence, diff_window: 0, backend: Drab.PresenceCase.backend()

    # Calls in all, and by topic: other tests' presences leave when their
    # processes' exits reach the table, and their calls count in all.
    @impl true
    def init(state), do: {:ok, Map.merge(state, %{calls: 0, by_topic: %{}})}

    @impl true
    def handle_metas(topic, diff, presences, state) do
      calls = state.calls + 1
      topic_calls = Map.get(state.by_topic, topic, 0) + 1

      if observer = Process.whereis(observer(String.replace_suffix(topic, ":other", ""))),
        do: send(observer, {:metas, self(), diff, presences, calls, topic_calls})

      cond do
        Map.has_key?(diff.joins, "raises") ->
          raise "boom"

        Map.has_key?(diff.joins, "bad return") ->
          :not_ok

        true ->
          {:ok, %{state | calls: calls, by_topic: Map.put(state.by_topic, topic, topic_calls)}}
      end
    end

    @impl true
    def fetch(_topic, presences) do
      Map.new(presences, fn {key, presence} -> {key, Map.put(presence, :fetched, true)} end)
    end

    def observer(topic), do: :"metas:#{topic}"
  end

  defmodule NoInit do
    use Drab.Presence, otp_app: :drab_presence, backend: Drab.PresenceCase.backend()

    def handle_metas(_topic, _diff, _presences, state), do: {:ok, state}
  end

  defmodule BadInit do
    use Drab.Presence, otp_app: :drab_presence, backend: Drab.PresenceCase.backend()

    def init(_state), do: :nope
    def handle_metas(_topic, _diff, _presences, state), do: {:ok, state}
  end

  setup_all do
    start_supervised!(Metas)
    :ok
  end

  setup %{topic: topic} do
    Process.register(self(), Metas.observer(topic))
    :ok
  end

  defp next_metas do
    assert_receive {:metas, pid, diff, presences, calls, _topic_calls}, 1_000
    {pid, diff, presences, calls}
  end

  # The calls on this test's topic so far, as the state counts them.
  defp next_topic_metas do
    assert_receive {:metas, _pid, _diff, presences, _calls, topic_calls}, 1_000
    {presences, topic_calls}
  end

  test "handle_metas/4 gets each diff in order, with presences and the state it returned",
       %{topic: topic} do
    [a, b] = [live_pid(), live_pid()]
    # One operation at a time: with any window, one diff each.
    {:ok, ref_a} = Metas.track(a, topic, "u1", %{n: 1})
    {metas_pid, d1, p1, c1} = next_metas()
    {:ok, ref_b} = Metas.track(b, topic, "u1", %{n: 2})
    {^metas_pid, d2, p2, c2} = next_metas()
    {:ok, ref_a2} = Metas.update(a, topic, "u1", %{n: 3})
    {^metas_pid, d3, p3, c3} = next_metas()
    :ok = Metas.untrack(b, topic, "u1")
    {^metas_pid, d4, p4, c4} = next_metas()
    Process.exit(a, :kill)
    {^metas_pid, d5, p5, c5} = next_metas()

    assert metas_pid == Process.whereis(Drab.Presence.Callbacks.name(Metas))

    # One call per operation, in order, and the state threads through them:
    # each call counts on from the state the one before returned. (Leaves of
    # the previous tests' processes, on their own topics, may be counted in
    # between: their exits reach the table when they do.)
    assert [c1, c2, c3, c4, c5] == Enum.sort(Enum.uniq([c1, c2, c3, c4, c5]))
    refute_receive {:metas, _, _, _, _, _}, 50

    # The diff as broadcast, through fetch/2.
    assert d1 == %{
             joins: %{"u1" => %{metas: [%{n: 1, phx_ref: ref_a}], fetched: true}},
             leaves: %{}
           }

    assert %{joins: %{"u1" => %{metas: [%{n: 2, phx_ref: ^ref_b}]}}, leaves: %{}} = d2

    assert %{
             joins: %{"u1" => %{metas: [%{n: 3, phx_ref: ^ref_a2, phx_ref_prev: ^ref_a}]}},
             leaves: %{"u1" => %{metas: [%{n: 1, phx_ref: ^ref_a}]}}
           } = d3

    assert %{joins: %{}, leaves: %{"u1" => %{metas: [%{n: 2}]}}} = d4
    assert %{joins: %{}, leaves: %{"u1" => %{metas: [%{n: 3}]}}} = d5

    # Presences as Phoenix builds them: %{key => [meta]}, metas in join order.
    assert p1 == %{"u1" => [%{n: 1, phx_ref: ref_a}]}
    assert [%{n: 1}, %{n: 2}] = p2["u1"]
    assert [%{n: 2}, %{n: 3}] = p3["u1"]
    assert [%{n: 3}] = p4["u1"]
    assert p5 == %{}
  end

  test "calls are serialised over topics, never in the caller", %{topic: topic} do
    for i <- 1..20 do
      {:ok, _} =
        Metas.track(
          live_pid(),
          if(rem(i, 2) == 0, do: topic, else: topic <> ":other"),
          "k#{i}",
          %{}
        )
    end

    calls =
      for _ <- 1..20 do
        {pid, _diff, _presences, calls} = next_metas()
        refute pid == self()
        calls
      end

    # Both topics' calls, one state: twenty counts, each once, each on from
    # the state before. (Not necessarily consecutive: leaves of earlier
    # tests' processes, on their own topics, may be counted in between.)
    assert length(Enum.uniq(calls)) == 20
  end

  test "a handle_metas/4 that raises or returns garbage is logged; the state is kept",
       %{topic: topic} do
    log =
      capture_log(fn ->
        {:ok, _} = Metas.track(live_pid(), topic, "raises", %{})
        {_, c1} = next_topic_metas()
        {:ok, _} = Metas.track(live_pid(), topic, "bad return", %{})
        {_, c2} = next_topic_metas()
        {:ok, _} = Metas.track(live_pid(), topic, "fine", %{})
        {presences, c3} = next_topic_metas()
        # The two failures did not move the state on.
        assert {c1, c2, c3} == {1, 1, 1}
        assert Map.keys(presences) == ["bad return", "fine", "raises"]
      end)

    assert log =~ "handle_metas/4 failed"
    assert log =~ "boom"

    assert log =~
             "expected Drab.Presence.CallbacksTest.Metas.handle_metas/4 to return {:ok, new_state}"
  end

  test "fetchers_pids/0: processes that exit once pending diffs reached handle_metas/4",
       %{topic: topic} do
    for i <- 1..50, do: {:ok, _} = Metas.track(live_pid(), topic, "k#{i}", %{})
    pids = Metas.fetchers_pids()
    assert is_list(pids)

    for pid <- pids do
      ref = Process.monitor(pid)
      assert_receive {:DOWN, ^ref, _, _, _}, 1_000
    end

    # Every call was made before the fetchers exited.
    for _ <- 1..50, do: assert_received({:metas, _, _, _, _, _})
    assert NoInit.fetchers_pids() == []
  end

  test "handle_metas/4 without init/1 raises Phoenix's error at start" do
    assert_raise ArgumentError,
                 ~r|missing Drab.Presence.CallbacksTest.NoInit.init/1 callback for client state|,
                 fn -> NoInit.start_link() end
  end

  test "an init/1 that does not return {:ok, state} fails the start" do
    assert {:error, reason} = start_supervised(BadInit)

    assert inspect(reason) =~
             "expected Drab.Presence.CallbacksTest.BadInit.init/1 to return {:ok, state}"
  end

  test "modules without handle_metas/4 start no callback process" do
    assert Process.whereis(Drab.Presence.Callbacks.name(Drab.Presence)) == nil
    assert is_pid(Process.whereis(Drab.Presence.Callbacks.name(Metas)))
  end
end
