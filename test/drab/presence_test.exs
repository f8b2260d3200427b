defmodule Drab.PresenceTest do
  use Drab.PresenceCase, async: true

  describe "track/4, list/1 and counts" do
    test "track returns a phx_ref and list groups metas by string key", %{topic: topic} do
      a = live_pid()
      b = live_pid()
      {:ok, ref} = Drab.Presence.track(a, topic, 42, %{name: "ann"})
      assert is_binary(ref)
      {:ok, _} = Drab.Presence.track(b, topic, 42, %{name: "ann, tab 2"})
      {:ok, _} = Drab.Presence.track(b, topic, "bob", %{name: "bob"})

      assert %{"42" => %{metas: [%{name: "ann", phx_ref: ^ref}, %{name: "ann, tab 2"}]}} =
               Drab.Presence.list(topic)

      assert bare(Drab.Presence.list(topic)) == %{
               "42" => [%{name: "ann"}, %{name: "ann, tab 2"}],
               "bob" => [%{name: "bob"}]
             }

      assert Drab.Presence.count_users(topic) == 2
      assert Drab.Presence.count_connections(topic) == 3
    end

    test "an empty topic lists as %{} and counts zero", %{topic: topic} do
      assert Drab.Presence.list(topic) == %{}
      assert Drab.Presence.count_users(topic) == 0
      assert Drab.Presence.count_connections(topic) == 0
    end

    test "tracking the same pid, topic and key twice is refused", %{topic: topic} do
      pid = live_pid()
      {:ok, _} = Drab.Presence.track(pid, topic, :k, %{})

      assert Drab.Presence.track(pid, topic, :k, %{}) ==
               {:error, {:already_tracked, pid, topic, :k}}

      assert Drab.Presence.count_connections(topic) == 1
    end

    test "metas are arbitrary terms and come back identical", %{topic: topic} do
      meta = %{
        tuple: {1, :two, "three"},
        list: [1.5, -7, 1_208_925_819_614_629_174_706_176],
        pid: self(),
        ref: make_ref(),
        fun: &Enum.map/2,
        nested: %{deep: %{binary: <<0, 255>>}}
      }

      {:ok, _} = Drab.Presence.track(live_pid(), topic, "k", meta)
      assert [listed] = Drab.Presence.list(topic)["k"].metas
      assert Map.delete(listed, :phx_ref) == meta
    end

    test "a socket stands for its channel pid and topic", %{topic: topic} do
      socket = socket(topic)
      {:ok, _} = Drab.Presence.track(socket, "k", %{a: 1})
      assert Drab.Presence.count_users(socket) == 1
      assert Drab.Presence.count_connections(socket) == 1
      assert %{"k" => _} = Drab.Presence.list(socket)
      assert %{metas: [%{a: 1}]} = Drab.Presence.get_by_key(socket, "k")
      {:ok, _} = Drab.Presence.update(socket, "k", %{a: 2})
      assert %{metas: [%{a: 2}]} = Drab.Presence.get_by_key(socket, "k")
      assert Drab.Presence.untrack(socket, "k") == :ok
      assert Drab.Presence.list(socket) == %{}
    end

    test "phx_refs are unique", %{topic: topic} do
      refs =
        for i <- 1..2_000 do
          {:ok, ref} = Drab.Presence.track(live_pid(), topic, i, %{})
          ref
        end

      assert length(Enum.uniq(refs)) == 2_000
    end
  end

  describe "get_by_key/2" do
    test "returns %{metas: ...} in pid order, or [] when absent", %{topic: topic} do
      first = live_pid()
      second = live_pid()
      {:ok, _} = Drab.Presence.track(second, topic, 1, %{name: "second"})
      {:ok, _} = Drab.Presence.track(first, topic, 1, %{name: "first"})
      {:ok, _} = Drab.Presence.track(first, topic, 2, %{name: "other"})

      assert %{metas: [%{name: "first"}, %{name: "second"}]} = Drab.Presence.get_by_key(topic, 1)
      # As Phoenix: keys are the terms tracked, so "1" is another key than 1.
      assert Drab.Presence.get_by_key(topic, "1") == []
      assert Drab.Presence.get_by_key(topic, 3) == []
      assert Drab.Presence.get_by_key(topic <> ":elsewhere", 1) == []
    end
  end

  describe "untrack" do
    test "untrack/3 removes one presence and returns :ok", %{topic: topic} do
      pid = live_pid()
      {:ok, _} = Drab.Presence.track(pid, topic, "a", %{})
      {:ok, _} = Drab.Presence.track(pid, topic, "b", %{})
      assert Drab.Presence.untrack(pid, topic, "a") == :ok
      assert Map.keys(Drab.Presence.list(topic)) == ["b"]
      assert Drab.Presence.untrack(pid, topic, "never") == :ok
      assert Drab.Presence.untrack(live_pid(), topic, "b") == :ok
      assert Drab.Presence.count_connections(topic) == 1
    end

    test "untracking the last presence of a pid lets it be tracked again", %{topic: topic} do
      pid = live_pid()
      {:ok, _} = Drab.Presence.track(pid, topic, "a", %{})
      :ok = Drab.Presence.untrack(pid, topic, "a")
      {:ok, _} = Drab.Presence.track(pid, topic, "a", %{})
      assert Drab.Presence.count_connections(topic) == 1
    end
  end

  describe "update" do
    test "a map replaces the meta, sets a new phx_ref and phx_ref_prev", %{topic: topic} do
      pid = live_pid()
      {:ok, ref} = Drab.Presence.track(pid, topic, "k", %{state: :idle})
      {:ok, new_ref} = Drab.Presence.update(pid, topic, "k", %{state: :typing})
      assert new_ref != ref

      assert %{"k" => %{metas: [%{state: :typing, phx_ref: ^new_ref, phx_ref_prev: ^ref}]}} =
               Drab.Presence.list(topic)
    end

    test "a function gets the current meta, phx_ref included", %{topic: topic} do
      pid = live_pid()
      {:ok, ref} = Drab.Presence.track(pid, topic, "k", %{n: 1})
      test = self()

      {:ok, _} =
        Drab.Presence.update(pid, topic, "k", fn meta ->
          send(test, {:seen, meta})
          %{meta | n: meta.n + 1}
        end)

      assert_received {:seen, %{n: 1, phx_ref: ^ref}}
      assert %{metas: [%{n: 2}]} = Drab.Presence.get_by_key(topic, "k")
    end

    test "concurrent function updates never lose an increment", %{topic: topic} do
      pid = live_pid()
      {:ok, _} = Drab.Presence.track(pid, topic, "k", %{n: 0})

      1..8
      |> Enum.map(fn _ ->
        Task.async(fn ->
          for _ <- 1..200,
              do: {:ok, _} = Drab.Presence.update(pid, topic, "k", &%{&1 | n: &1.n + 1})
        end)
      end)
      |> Enum.each(&Task.await/1)

      assert %{metas: [%{n: 1600}]} = Drab.Presence.get_by_key(topic, "k")
    end

    test "an unchanged meta keeps its phx_ref", %{topic: topic} do
      pid = live_pid()
      {:ok, ref} = Drab.Presence.track(pid, topic, "k", %{a: 1})
      assert Drab.Presence.update(pid, topic, "k", %{a: 1}) == {:ok, ref}
      assert Drab.Presence.update(pid, topic, "k", & &1) == {:ok, ref}
    end

    test "updating what is not tracked returns {:error, :nopresence} as Phoenix does", %{
      topic: topic
    } do
      assert Drab.Presence.update(live_pid(), topic, "k", %{}) == {:error, :nopresence}
      assert Drab.Presence.update(live_pid(), topic, "k", & &1) == {:error, :nopresence}
    end
  end

  describe "processes that exit" do
    test "leave, whatever the exit reason", %{topic: topic} do
      for reason <- [:normal, :kill, :shutdown, {:shutdown, :closed}] do
        pid = spawn(fn -> receive(do: (:go -> exit(reason))) end)
        {:ok, _} = Drab.Presence.track(pid, topic, "k", %{})
        {:ok, _} = Drab.Presence.track(pid, topic <> ":2", "k", %{})
        ref = Process.monitor(pid)
        if reason == :kill, do: Process.exit(pid, :kill), else: send(pid, :go)
        assert_receive {:DOWN, ^ref, _, _, _}
        wait_until(fn -> Drab.Presence.count_connections(topic) == 0 end)
        wait_until(fn -> Drab.Presence.count_connections(topic <> ":2") == 0 end)
      end
    end

    @tag :capture_log
    test "a crashing process leaves and is broadcast as a leave", %{topic: topic} do
      :ok = Drab.Presence.subscribe(topic)
      pid = spawn(fn -> receive(do: (:crash -> raise "boom")) end)
      {:ok, ref} = Drab.Presence.track(pid, topic, "k", %{})
      assert %{joins: %{"k" => _}} = assert_diff(topic)
      send(pid, :crash)
      assert %{joins: joins, leaves: %{"k" => %{metas: [%{phx_ref: ^ref}]}}} = assert_diff(topic)
      assert joins == %{}
      assert Drab.Presence.list(topic) == %{}
    end
  end

  describe "presence_diff" do
    test "has Phoenix.Presence's shape, passed through fetch", %{topic: topic} do
      :ok = Drab.Presence.subscribe(topic)
      pid = live_pid()
      {:ok, ref} = Drab.Presence.track(pid, topic, 7, %{name: "u"})

      assert %{joins: %{"7" => %{metas: [%{name: "u", phx_ref: ^ref}]}}, leaves: leaves} =
               assert_diff(topic)

      assert leaves == %{}

      {:ok, new_ref} = Drab.Presence.update(pid, topic, 7, %{name: "v"})

      assert %{
               joins: %{"7" => %{metas: [%{name: "v", phx_ref: ^new_ref, phx_ref_prev: ^ref}]}},
               leaves: %{"7" => %{metas: [%{name: "u", phx_ref: ^ref}]}}
             } = assert_diff(topic)
    end

    test "changes inside the window go out as one diff", %{topic: topic} do
      :ok = Drab.Presence.subscribe(topic)
      for i <- 1..500, do: {:ok, _} = Drab.Presence.track(live_pid(), topic, rem(i, 50), %{i: i})
      payload = assert_diff(topic)
      diffs = [payload | collect_diffs(topic)]
      # 500 tracks within a 20 ms window or two: a handful of diffs, not 500.
      assert length(diffs) < 10
      joined = diffs |> Enum.flat_map(&Enum.flat_map(&1.joins, fn {_, %{metas: m}} -> m end))
      assert length(joined) == 500
    end

    test "a join and leave inside one window cancel out", %{topic: topic} do
      :ok = Drab.Presence.subscribe(topic)
      pid = live_pid()
      {:ok, _} = Drab.Presence.track(pid, topic, "flicker", %{})
      :ok = Drab.Presence.untrack(pid, topic, "flicker")
      {:ok, _} = Drab.Presence.track(live_pid(), topic, "stays", %{})
      assert %{joins: joins, leaves: leaves} = assert_diff(topic)
      assert Map.keys(joins) == ["stays"]
      assert leaves == %{}
      assert collect_diffs(topic) == []
    end

    test "an update that does not change the meta sends nothing", %{topic: topic} do
      :ok = Drab.Presence.subscribe(topic)
      pid = live_pid()
      {:ok, _} = Drab.Presence.track(pid, topic, "k", %{a: 1})
      assert_diff(topic)
      {:ok, _} = Drab.Presence.update(pid, topic, "k", %{a: 1})
      {:ok, _} = Drab.Presence.update(pid, topic, "k", fn meta -> meta end)
      assert collect_diffs(topic) == []
    end

    test "untracking what is not tracked sends nothing", %{topic: topic} do
      :ok = Drab.Presence.subscribe(topic)
      :ok = Drab.Presence.untrack(live_pid(), topic, "k")
      assert collect_diffs(topic) == []
    end

    test "subscribers of other topics hear nothing", %{topic: topic} do
      :ok = Drab.Presence.subscribe(topic <> ":other")
      {:ok, _} = Drab.Presence.track(live_pid(), topic, "k", %{})
      refute_receive %{event: "presence_diff"}, 150
    end
  end

  describe "Drab's start/2 and stop/2" do
    test "track the socket under its browser id and untrack it", %{topic: topic} do
      socket = socket(topic, %{__client_id: "browser-1"})
      assert {:ok, ref} = Drab.Presence.start(socket, topic)
      assert is_binary(ref)
      assert %{"browser-1" => %{metas: [%{online_at: online_at}]}} = Drab.Presence.list(topic)
      assert_in_delta online_at, System.system_time(:second), 5
      assert Drab.Presence.stop(socket, topic) == :ok
      assert Drab.Presence.list(topic) == %{}
    end

    test "start/2 twice treats already_tracked as ok, as Drab does", %{topic: topic} do
      socket = socket(topic)
      {:ok, _} = Drab.Presence.start(socket, topic)
      pid = socket.channel_pid
      id = socket.assigns.__client_id
      assert Drab.Presence.start(socket, topic) == {:ok, {:already_tracked, pid, topic, id}}
    end

    test "start/2 on another topic tracks there too", %{topic: topic} do
      socket = socket(topic)
      {:ok, _} = Drab.Presence.start(socket, topic)
      {:ok, _} = Drab.Presence.start(socket, topic <> ":ext")
      assert Drab.Presence.count_connections(topic <> ":ext") == 1
    end
  end

  describe "bad input is refused and loses nothing" do
    setup %{topic: topic} do
      pid = live_pid()
      {:ok, _} = Drab.Presence.track(pid, topic, "kept", %{a: 1})
      {:ok, pid: pid, before: Drab.Presence.list(topic)}
    end

    test "a topic that is not a binary", %{topic: topic, pid: pid, before: before} do
      for bad <- [:lobby, 'lobby', 1, nil] do
        assert_raise ArgumentError, ~r/topic must be a binary/, fn ->
          Drab.Presence.track(pid, bad, "k", %{})
        end

        assert_raise ArgumentError, ~r/topic must be a binary/, fn -> Drab.Presence.list(bad) end
        assert_raise ArgumentError, ~r/topic/, fn -> Drab.Presence.count_users(bad) end
      end

      assert Drab.Presence.list(topic) == before
    end

    test "a meta that is not a map", %{topic: topic, pid: pid, before: before} do
      for bad <- [[a: 1], nil, "meta", {:a, 1}] do
        assert_raise ArgumentError, ~r/meta must be a map/, fn ->
          Drab.Presence.track(live_pid(), topic, "k", bad)
        end

        assert_raise ArgumentError, ~r/meta must be a map/, fn ->
          Drab.Presence.update(pid, topic, "kept", bad)
        end
      end

      assert Drab.Presence.list(topic) == before
    end

    test "an update function that raises or returns a non-map",
         %{topic: topic, pid: pid, before: before} do
      assert_raise ArgumentError, ~r/update function .* raised RuntimeError: nope/, fn ->
        Drab.Presence.update(pid, topic, "kept", fn _ -> raise "nope" end)
      end

      assert_raise ArgumentError, ~r/meta must be a map/, fn ->
        Drab.Presence.update(pid, topic, "kept", fn _ -> :not_a_map end)
      end

      assert Drab.Presence.list(topic) == before
    end

    test "a dead pid is tracked as Phoenix tracks it: {:ok, ref}, gone at once",
         %{topic: topic, before: before} do
      :ok = Drab.Presence.subscribe(topic)
      dead = spawn(fn -> :ok end)
      ref = Process.monitor(dead)
      assert_receive {:DOWN, ^ref, _, _, _}

      assert {:ok, phx_ref} = Drab.Presence.track(dead, topic, "ghost", %{})
      assert is_binary(phx_ref)
      assert Drab.Presence.list(topic) == before
      assert Drab.Presence.get_by_key(topic, "ghost") == []
      assert Drab.Presence.count_connections(topic) == map_size(before)
      assert Drab.Presence.update(dead, topic, "ghost", %{}) == {:error, :nopresence}
      # A join and its leave inside one window: nothing to send.
      refute_receive %{event: "presence_diff", payload: %{joins: %{"ghost" => _}}}, 100
      refute_received %{event: "presence_diff", payload: %{leaves: %{"ghost" => _}}}

      assert_raise ArgumentError, ~r/expected a pid/, fn ->
        Drab.Presence.track(:not_a_pid, topic, "ghost", %{})
      end

      # A pid of another node (NEW_PID_EXT naming a node that is not us).
      node = "elsewhere@nohost"

      remote =
        :erlang.binary_to_term(<<131, 88, 119, byte_size(node), node::binary, 1::32, 0::32, 1::32>>)

      assert_raise ArgumentError, ~r/lives on :elsewhere@nohost/, fn ->
        Drab.Presence.track(remote, topic, "ghost", %{})
      end

      assert Drab.Presence.list(topic) == before
    end

    test "a huge meta", %{topic: topic, pid: pid, before: before} do
      huge = %{blob: :binary.copy("x", 100_000)}

      assert_raise ArgumentError, ~r/over the :max_meta_bytes limit/, fn ->
        Drab.Presence.track(live_pid(), topic, "huge", huge)
      end

      assert_raise ArgumentError, ~r/over the :max_meta_bytes limit/, fn ->
        Drab.Presence.update(pid, topic, "kept", huge)
      end

      assert Drab.Presence.list(topic) == before
    end

    test "a key that cannot become a string", %{topic: topic, before: before} do
      assert_raise ArgumentError, ~r/key must be convertible to a string/, fn ->
        Drab.Presence.track(live_pid(), topic, {:tuple, :key}, %{})
      end

      assert Drab.Presence.list(topic) == before
    end

    test "calls before the module is started", %{topic: topic} do
      defmodule NeverStarted do
        use Drab.Presence, otp_app: :drab_presence, backend: Drab.PresenceCase.backend()
      end

      assert_not_started(NeverStarted, topic)
    end

    @tag :nif_only
    test "a Rust panic is an exception; the VM and the table carry on",
         %{topic: topic, before: before} do
      assert_raise ErlangError, ~r/nif_panicked/, fn -> Drab.Presence.Native.test_panic() end
      assert Drab.Presence.list(topic) == before
    end
  end

  defp collect_diffs(topic) do
    receive do
      %{event: "presence_diff", topic: ^topic, payload: payload} -> [payload | collect_diffs(topic)]
    after
      150 -> []
    end
  end
end
