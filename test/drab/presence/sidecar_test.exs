defmodule Drab.Presence.SidecarTest do
  # The sidecar backend's own guarantees: a kill -9 under churn loses no
  # presence and subscribers converge; closing stdin ends the process; bad
  # frames and an unknown protocol version are refused, not fatal.
  # Runs with DRAB_PRESENCE_BACKEND=sidecar (scripts/test's second pass).
  use Drab.PresenceCase, async: false

  @moduletag :sidecar_only
  @moduletag :capture_log
  @moduletag timeout: 120_000

  alias Drab.Presence.Backend.Sidecar
  alias Drab.Presence.Runtime

  defmodule Crashy do
    use Drab.Presence, otp_app: :drab_presence, backend: :sidecar, diff_window: 10
  end

  @topics for i <- 1..5, do: "crash:#{i}"
  @keys for i <- 1..20, do: "user#{i}"

  setup_all do
    {:ok, pid} = Crashy.start_link()
    Process.unlink(pid)
    :ok
  end

  defp table, do: Runtime.fetch!(Crashy).table

  defp kill_sidecar! do
    os_pid = wait_for_os_pid()
    {_, 0} = System.cmd("kill", ["-9", Integer.to_string(os_pid)])
    os_pid
  end

  defp wait_for_os_pid do
    case Sidecar.os_pid(table()) do
      nil -> Process.sleep(5) && wait_for_os_pid()
      os_pid -> os_pid
    end
  end

  test "kill -9 during a churn of track/untrack/exit: the table equals the model, views converge" do
    viewers = for topic <- @topics, into: %{}, do: {topic, start_viewer(topic)}
    parent = self()

    workers =
      for w <- 1..4 do
        spawn_link(fn ->
          :rand.seed(:exsss, {w, 1, 2})
          owners = for _ <- 1..10, do: spawn_owner()
          model = churn(owners, %{}, System.monotonic_time(:millisecond) + 3_000)
          send(parent, {:model, self(), model})
          receive do: (:done -> :ok)
        end)
      end

    kills =
      for _ <- 1..5 do
        Process.sleep(400)
        kill_sidecar!()
      end

    model =
      Enum.reduce(workers, %{}, fn w, acc ->
        receive do
          {:model, ^w, model} -> Map.merge(acc, model)
        after
          30_000 -> flunk("a churn worker did not finish")
        end
      end)

    assert length(Enum.uniq(kills)) == 5, "every kill hit a new sidecar"

    # One more, with the churn over: recovery is timed from here.
    kill_sidecar!()
    t0 = System.monotonic_time(:millisecond)
    wait_until(fn -> tables_equal?(model) end, 300)
    recovered_ms = System.monotonic_time(:millisecond) - t0
    IO.puts("\nsidecar: list/1 and counts equal the model #{recovered_ms} ms after kill -9")
    assert recovered_ms < 2_000

    wait_until(fn ->
      stats = Crashy.stats()
      stats.pending_topics == 0 and stats.queued_parts == 0
    end)

    for topic <- @topics do
      expected = Crashy.list(topic)
      viewer = viewers[topic]

      wait_until(
        fn ->
          send(viewer, {:view, self()})
          receive do: ({:view, view} -> bare(view) == bare(expected))
        end,
        300
      )
      |> case do
        :ok -> :ok
      end
    end

    Enum.each(workers, &send(&1, :done))
  end

  # A port owner killed right after a burst of tracks: the owners of those
  # presences must still leave when they exit. Its successor must also wake the dispatcher,
  # which registered with the dead one, so that subscribers hear of the
  # leaves.
  test "a port owner killed after a burst of tracks: owners leave, subscribers hear it" do
    topic = "watch:#{System.unique_integer([:positive])}"
    viewer = start_viewer(topic)
    owners = for _ <- 1..2_000, do: spawn_owner()

    tasks =
      for chunk <- owners |> Enum.with_index() |> Enum.chunk_every(500) do
        Task.async(fn ->
          for {owner, i} <- chunk, do: {:ok, _} = Crashy.track(owner, topic, "u#{i}", %{})
        end)
      end

    Enum.each(tasks, &Task.await/1)
    Process.exit(Process.whereis(table().port_owner), :kill)

    wait_until(fn ->
      Crashy.count_connections(topic) == 2_000 and Sidecar.os_pid(table()) != nil
    end)

    # The dispatcher done with the joins and idle: only a wake from the new
    # port owner gets the leaves out.
    wait_until(fn ->
      send(viewer, {:view, self()})
      receive do: ({:view, view} -> map_size(view) == 2_000)
    end)

    wait_until(fn ->
      stats = Crashy.stats()
      stats.pending_topics == 0 and stats.queued_parts == 0
    end)

    Process.sleep(50)
    Enum.each(owners, &Process.exit(&1, :kill))
    wait_until(fn -> Crashy.list(topic) == %{} and Crashy.count_connections(topic) == 0 end, 300)

    wait_until(fn ->
      send(viewer, {:view, self()})
      receive do: ({:view, view} -> view == %{})
    end)
  end

  # Writes are decided on the BEAM side and not answered, so writes of one
  # owner from many processes must reach the sidecar in the order they were
  # decided in: at the end it holds exactly the journal's presences, refs
  # and all, and the counts agree.
  test "many processes writing one owner's presences: the sidecar holds what the journal does" do
    topic = "one-owner:#{System.unique_integer([:positive])}"
    owner = spawn_owner()
    keys = for i <- 1..4, do: "k#{i}"
    deadline = System.monotonic_time(:millisecond) + 1_500

    writers =
      for w <- 1..8 do
        Task.async(fn ->
          :rand.seed(:exsss, {w, 7, 7})
          write_randomly(owner, topic, keys, deadline, 0)
        end)
      end

    writes = writers |> Enum.map(&Task.await(&1, 10_000)) |> Enum.sum()
    assert writes > 1_000

    journal =
      for key <- keys,
          {:ok, {meta, ref}} <- [Sidecar.lookup(table(), owner, topic, key)],
          into: %{},
          do: {key, {meta.n, Drab.Presence.Sidecar.Wire.ref_string(ref)}}

    listed =
      for {key, %{metas: [meta]}} <- Crashy.list(topic),
          into: %{},
          do: {key, {meta.n, meta.phx_ref}}

    assert listed == journal
    assert Crashy.count_connections(topic) == map_size(journal)
    assert Crashy.count_users(topic) == map_size(journal)
  end

  defp write_randomly(owner, topic, keys, deadline, writes) do
    if System.monotonic_time(:millisecond) > deadline do
      writes
    else
      key = Enum.random(keys)

      case :rand.uniform(3) do
        1 -> Crashy.track(owner, topic, key, %{n: :rand.uniform(1_000)})
        2 -> Crashy.untrack(owner, topic, key)
        3 -> Crashy.update(owner, topic, key, %{n: :rand.uniform(1_000)})
      end

      write_randomly(owner, topic, keys, deadline, writes + 1)
    end
  end

  # A writer killed by an exit it cannot trap, between journaling a write
  # and writing it to the port, leaves its lock behind and the sidecar one
  # presence short. The next writer of that owner waits for the port owner
  # to repair it: the presence is resynced into the sidecar, the counts
  # recomputed, the lock gone. One of a dead owner is removed instead.
  test "a writer killed holding an owner's lock: the owner is resynced, the counts recomputed" do
    alias Drab.Presence.Sidecar.{Wire, Writes}

    table = table()
    topic = "killed-writer:#{System.unique_integer([:positive])}"
    live = spawn_owner()
    gone = spawn_owner()

    half_done = fn owner_pid, key ->
      writer =
        spawn(fn ->
          owner = Wire.pid_id(owner_pid)
          true = :ets.insert_new(table.locks, {owner, self()})
          meta = :erlang.term_to_binary(%{half: true})

          true =
            :ets.insert_new(table.journal, {{owner, topic, key}, Writes.new_ref(table), meta, nil})

          # Killed here: counted, never sent, lock held.
          Writes.count(table.counts, topic, key, 1)
        end)

      ref = Process.monitor(writer)
      assert_receive {:DOWN, ^ref, :process, ^writer, _}
    end

    half_done.(live, "half")
    half_done.(gone, "orphan")
    Process.exit(gone, :kill)
    assert Crashy.count_connections(topic) == 2
    assert Crashy.list(topic) == %{}

    # The next write of the live owner waits for the repair.
    {:ok, _} = Crashy.track(live, topic, "next", %{})

    wait_until(fn ->
      Map.keys(Crashy.list(topic)) == ["half", "next"] and
        Crashy.count_connections(topic) == 2 and :ets.tab2list(table.locks) == []
    end)

    assert [%{half: true}] = Crashy.list(topic)["half"].metas
    assert Crashy.count_users(topic) == 2
    Process.exit(live, :kill)
    wait_until(fn -> Crashy.list(topic) == %{} and Crashy.count_connections(topic) == 0 end)
  end

  defp tables_equal?(model) do
    Enum.all?(@topics, fn topic ->
      expected =
        for {{_pid, ^topic, key}, meta} <- model, reduce: %{} do
          acc -> Map.update(acc, key, [meta], &[meta | &1])
        end

      listed =
        for {key, %{metas: metas}} <- Crashy.list(topic), into: %{} do
          {key, metas |> Enum.map(&Map.drop(&1, [:phx_ref, :phx_ref_prev]))}
        end

      users = map_size(expected)
      connections = expected |> Map.values() |> Enum.map(&length/1) |> Enum.sum()

      Map.new(listed, fn {k, v} -> {k, Enum.sort(v)} end) ==
        Map.new(expected, fn {k, v} -> {k, Enum.sort(v)} end) and
        Crashy.count_users(topic) == users and
        Crashy.count_connections(topic) == connections
    end)
  end

  # Random operations on this worker's own owners; returns what must be
  # tracked at the end, as {pid, topic, key} => meta.
  defp churn(owners, model, deadline) do
    if System.monotonic_time(:millisecond) > deadline do
      Enum.each(owners, &Process.unlink/1)
      model
    else
      owner = Enum.random(owners)
      topic = Enum.random(@topics)
      key = Enum.random(@keys)

      case :rand.uniform(10) do
        n when n <= 5 ->
          meta = %{n: :rand.uniform(3)}

          case Crashy.track(owner, topic, key, meta) do
            {:ok, _} -> churn(owners, Map.put(model, {owner, topic, key}, meta), deadline)
            {:error, {:already_tracked, _, _, _}} -> churn(owners, model, deadline)
          end

        n when n <= 7 ->
          :ok = Crashy.untrack(owner, topic, key)
          churn(owners, Map.delete(model, {owner, topic, key}), deadline)

        8 ->
          meta = %{n: :rand.uniform(3)}

          case Crashy.update(owner, topic, key, meta) do
            {:ok, _} -> churn(owners, Map.put(model, {owner, topic, key}, meta), deadline)
            {:error, :nopresence} -> churn(owners, model, deadline)
          end

        _ ->
          Process.exit(owner, :kill)
          model = for {{pid, _, _}, _} = e <- model, pid != owner, into: %{}, do: e
          churn([spawn_owner() | List.delete(owners, owner)], model, deadline)
      end
    end
  end

  defp spawn_owner, do: spawn(fn -> Process.sleep(:infinity) end)

  defp start_viewer(topic) do
    parent = self()

    pid =
      spawn_link(fn ->
        :ok = Crashy.subscribe(topic)
        send(parent, {:subscribed, self()})
        view_loop(topic, %{})
      end)

    receive do: ({:subscribed, ^pid} -> pid)
  end

  defp view_loop(topic, view) do
    receive do
      %{event: "presence_diff", topic: ^topic, payload: payload} ->
        view_loop(topic, sync_diff(view, payload))

      {:view, from} ->
        send(from, {:view, view})
        view_loop(topic, view)
    end
  end

  describe "the sidecar process" do
    test "ends when its stdin closes" do
      port = open_sidecar()
      {:os_pid, os_pid} = Port.info(port, :os_pid)
      Port.close(port)
      wait_until(fn -> not os_alive?(os_pid) end)
    end

    test "refuses an unknown protocol version with a clear message, then exits" do
      port = open_sidecar()
      Port.command(port, [1, <<7::64, 0::64>>, "DRPS", <<99::16>>])
      assert_receive {^port, {:data, <<1, 7::64, 0::64, 8, message::binary>>}}, 5_000
      assert message =~ "protocol version 99 is not supported"
      assert_receive {^port, {:exit_status, 2}}, 5_000
    end

    test "answers truncated and garbage frames with an error and carries on", %{topic: topic} do
      {_epoch, port} = Drab.Presence.Sidecar.Table.current(table())
      os_pid = Sidecar.os_pid(table())

      for frame <- [
            <<>>,
            <<200, 1, 2>>,
            <<16, 1::64, 0::64, 1::32>>,
            :crypto.strong_rand_bytes(300)
          ] do
        Port.command(port, frame)
      end

      {:ok, _} = Crashy.track(live_pid(), topic, "k", %{a: 1})
      assert Crashy.count_connections(topic) == 1
      assert Sidecar.os_pid(table()) == os_pid, "the sidecar was not restarted"
    end
  end

  defp open_sidecar do
    Port.open({:spawn_executable, Sidecar.executable()}, [
      :binary,
      {:packet, 4},
      :exit_status,
      :use_stdio
    ])
  end

  defp os_alive?(os_pid) do
    match?({_, 0}, System.cmd("kill", ["-0", Integer.to_string(os_pid)], stderr_to_stdout: true))
  end
end
