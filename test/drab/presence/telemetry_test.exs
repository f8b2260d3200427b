defmodule Drab.Presence.TelemetryTest do
  # Every kind of event, with the real :telemetry (built outside the repo
  # and put on ERL_LIBS; tagged :telemetry and skipped, with a message, when
  # it is not on the code path). Diffs and fetch/2 failures on the suite's
  # backend; a sidecar's restart and resync on the sidecar (:sidecar_only);
  # a peer's up, resync and down between this VM and a :peer node.
  use Drab.Presence.ClusterCase

  import Drab.PresenceCase, only: [live_pid: 0]

  alias Drab.Presence.Backend.Sidecar
  alias Drab.Presence.Runtime

  @compile {:no_warn_undefined, :telemetry}

  @moduletag :telemetry
  @moduletag :capture_log
  @moduletag timeout: 120_000

  @events [
    [:drab_presence, :diff, :broadcast],
    [:drab_presence, :fetch, :exception],
    [:drab_presence, :sidecar, :restart],
    [:drab_presence, :sidecar, :resync],
    [:drab_presence, :cluster, :peer_up],
    [:drab_presence, :cluster, :peer_down],
    [:drab_presence, :cluster, :resync]
  ]

  defmodule Diffs do
    use Drab.Presence,
      otp_app: :drab_presence,
      backend: Drab.PresenceCase.backend(),
      diff_window: 100,
      cluster: false

    def fetch("boom:" <> _, _presences), do: raise("boom")
    def fetch(_topic, presences), do: presences
  end

  defmodule OnSidecar do
    use Drab.Presence, otp_app: :drab_presence, backend: :sidecar, diff_window: 10, cluster: false
  end

  @doc false
  def forward(event, measurements, metadata, test_pid),
    do: send(test_pid, {:telemetry, event, measurements, metadata})

  setup_all do
    {:ok, _} = Application.ensure_all_started(:telemetry)
    :ok
  end

  setup context do
    id = {__MODULE__, context.test}
    :ok = :telemetry.attach_many(id, @events, &__MODULE__.forward/4, self())
    on_exit(fn -> :telemetry.detach(id) end)
    {:ok, topic: "telemetry:#{System.unique_integer([:positive])}"}
  end

  test "a diff part's broadcast: joins, leaves, latency from its oldest change", %{topic: topic} do
    start_supervised!(Diffs)
    # Diffs of earlier tests (their processes' leaves) out of the way: the
    # dispatcher idle, the next change waits a whole window.
    await_idle(Diffs)
    user = live_pid()
    first_at = System.monotonic_time(:microsecond)
    {:ok, _} = Diffs.track(user, topic, "ann", %{})
    Process.sleep(15)
    {:ok, _} = Diffs.track(live_pid(), topic, "ann", %{})
    {:ok, _} = Diffs.track(live_pid(), topic, "bob", %{})

    assert_receive {:telemetry, [:drab_presence, :diff, :broadcast], measurements,
                    %{module: Diffs, topic: ^topic}},
                   2_000

    # Three presences under two keys, counted from the first track: at
    # least the 15 ms before the last, at most what this process waited.
    waited_ms = (System.monotonic_time(:microsecond) - first_at) / 1_000
    assert %{joins: 3, leaves: 0, latency_ms: latency} = measurements
    assert is_float(latency) and latency >= 15 and latency <= waited_ms

    :ok = Diffs.untrack(user, topic, "ann")

    assert_receive {:telemetry, [:drab_presence, :diff, :broadcast],
                    %{joins: 0, leaves: 1, latency_ms: latency}, %{topic: ^topic}},
                   2_000

    assert latency > 0
  end

  test "fetch/2 failing: the part dropped, with the exception" do
    start_supervised!(Diffs)
    topic = "boom:#{System.unique_integer([:positive])}"
    {:ok, _} = Diffs.track(live_pid(), topic, "ann", %{})

    assert_receive {:telemetry, [:drab_presence, :fetch, :exception], %{joins: 1, leaves: 0},
                    metadata},
                   2_000

    assert %{module: Diffs, topic: ^topic, kind: :error, reason: %RuntimeError{}} = metadata
    assert [_ | _] = metadata.stacktrace
    refute_received {:telemetry, [:drab_presence, :diff, :broadcast], _, %{topic: ^topic}}
  end

  describe "the sidecar" do
    @describetag :sidecar_only

    test "killed: restarted and replayed", %{topic: topic} do
      start_supervised!(OnSidecar)
      for key <- ~w(a b c), do: {:ok, _} = OnSidecar.track(live_pid(), topic, key, %{})
      table = Runtime.fetch!(OnSidecar).table
      os_pid = wait_for(fn -> Sidecar.os_pid(table) end)
      {_, 0} = System.cmd("kill", ["-9", Integer.to_string(os_pid)])

      assert_receive {:telemetry, [:drab_presence, :sidecar, :restart], measurements,
                      %{module: OnSidecar, reason: reason}},
                     5_000

      assert reason =~ ~r/exited with status|closed/
      assert %{presences: presences, duration_ms: duration} = measurements
      # Every presence this table journaled, the three of this test included.
      assert presences >= 3
      assert is_float(duration) and duration >= 0
      assert OnSidecar.count_connections(topic) == 3
    end

    # As sidecar_test.exs leaves one: a writer killed between journaling a
    # write and sending it, its lock held.
    test "an owner whose writer was killed mid-write: resynced", %{topic: topic} do
      alias Drab.Presence.Sidecar.{Wire, Writes}

      start_supervised!(OnSidecar)
      h = Runtime.fetch!(OnSidecar).table
      owner = live_pid()

      writer =
        spawn(fn ->
          id = Wire.pid_id(owner)
          true = :ets.insert_new(h.locks, {id, self()})
          meta = :erlang.term_to_binary(%{half: true})
          true = :ets.insert_new(h.journal, {{id, topic, "half"}, Writes.new_ref(h), meta, nil})
          Writes.count(h.counts, topic, "half", 1)
        end)

      ref = Process.monitor(writer)
      assert_receive {:DOWN, ^ref, :process, ^writer, _}

      assert_receive {:telemetry, [:drab_presence, :sidecar, :resync], %{owners: 1},
                      %{module: OnSidecar}},
                     5_000
    end
  end

  test "a peer: up, its state synced, then down with its presences" do
    module = Module.concat(__MODULE__, "P#{System.unique_integer([:positive])}")
    topic = "cluster:#{System.unique_integer([:positive])}"

    opts = [
      pubsub_server: nil,
      backend: Drab.PresenceCase.backend(),
      diff_window: 20,
      heartbeat_period: 200,
      down_period: 2_000
    ]

    [b] = start_peers(1)
    for n <- [node(), b], do: :ok = call(n, Drab.Presence.ClusterRemote, :start, [module, opts])

    assert_receive {:telemetry, [:drab_presence, :cluster, :peer_up], %{},
                    %{module: ^module, node: ^b}},
                   5_000

    assert_receive {:telemetry, [:drab_presence, :cluster, :resync], %{bytes: bytes},
                    %{module: ^module, node: ^b}},
                   5_000

    assert is_integer(bytes) and bytes >= 0

    call(b, Drab.Presence.ClusterRemote, :owner, [module, topic, ["x", "y"], %{}])
    wait_until(fn -> module.count_connections(topic) == 2 end)

    kill_peer(b)

    assert_receive {:telemetry, [:drab_presence, :cluster, :peer_down], %{presences: 2},
                    %{module: ^module, node: ^b, reason: reason}},
                   5_000

    assert reason =~ "went down"
    Supervisor.stop(module)
  end

  defp await_idle(module) do
    for pid <- module.fetchers_pids() do
      ref = Process.monitor(pid)
      assert_receive {:DOWN, ^ref, _, _, _}, 5_000
    end
  end

  defp wait_for(fun, tries \\ 500) do
    case fun.() do
      nil when tries > 0 -> Process.sleep(10) && wait_for(fun, tries - 1)
      value when value != nil -> value
    end
  end
end
