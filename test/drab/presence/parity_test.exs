defmodule Drab.Presence.ParityTest do
  # Phoenix.Presence parity: `diff_window: 0` sends Phoenix's diffs, one per
  # operation, in order.
  use Drab.PresenceCase, async: true

  defmodule Exact do
    use Drab.Presence,
      otp_app: :drab_presence,
      diff_window: 0,
      backend: Drab.PresenceCase.backend()
  end

  setup_all do
    start_supervised!(Exact)
    :ok
  end

  setup %{topic: topic} do
    :ok = Exact.subscribe(topic)
    :ok
  end

  # The next `n` diffs of `topic`, in the order they arrived, then nothing.
  defp diffs(topic, n) do
    # Not 1..n//1 (Elixir 1.12): n may be 0.
    diffs = for _ <- List.duplicate(:diff, n), do: assert_diff(topic)
    refute_receive %{event: "presence_diff", topic: ^topic}, 50
    diffs
  end

  defp dead_pid do
    pid = spawn(fn -> :ok end)
    ref = Process.monitor(pid)
    assert_receive {:DOWN, ^ref, _, _, _}
    pid
  end

  describe "diff_window: 0" do
    test "one diff per operation, in order, nothing cancelled or merged", %{topic: topic} do
      [a, b] = [live_pid(), live_pid()]
      {:ok, r1} = Exact.track(a, topic, "u1", %{n: 1})
      {:ok, r2} = Exact.update(a, topic, "u1", %{n: 2})
      # A no-op update sends nothing (the one difference from Phoenix).
      {:ok, ^r2} = Exact.update(a, topic, "u1", %{n: 2})
      {:ok, rb} = Exact.track(b, topic, "u2", %{})
      :ok = Exact.untrack(b, topic, "u2")
      {:ok, r3} = Exact.update(a, topic, "u1", &Map.put(&1, :n, 3))
      :ok = Exact.untrack(a, topic, "u1")

      assert diffs(topic, 6) == [
               %{joins: %{"u1" => %{metas: [%{n: 1, phx_ref: r1}]}}, leaves: %{}},
               %{
                 joins: %{"u1" => %{metas: [%{n: 2, phx_ref: r2, phx_ref_prev: r1}]}},
                 leaves: %{"u1" => %{metas: [%{n: 1, phx_ref: r1}]}}
               },
               %{joins: %{"u2" => %{metas: [%{phx_ref: rb}]}}, leaves: %{}},
               %{joins: %{}, leaves: %{"u2" => %{metas: [%{phx_ref: rb}]}}},
               %{
                 joins: %{"u1" => %{metas: [%{n: 3, phx_ref: r3, phx_ref_prev: r2}]}},
                 leaves: %{"u1" => %{metas: [%{n: 2, phx_ref: r2, phx_ref_prev: r1}]}}
               },
               %{joins: %{}, leaves: %{"u1" => %{metas: [%{n: 3, phx_ref: r3, phx_ref_prev: r2}]}}}
             ]
    end

    test "an exit is one diff of leaves per topic", %{topic: topic} do
      pid = live_pid()
      other = topic <> ":other"
      :ok = Exact.subscribe(other)
      refs = for key <- ~w(a b c), do: elem(Exact.track(pid, topic, key, %{}), 1)
      {:ok, other_ref} = Exact.track(pid, other, "a", %{})
      assert length(diffs(topic, 3)) == 3
      assert [_] = diffs(other, 1)

      Process.exit(pid, :kill)
      assert [%{joins: joins, leaves: leaves}] = diffs(topic, 1)
      assert joins == %{}

      assert leaves
             |> Map.values()
             |> Enum.flat_map(& &1.metas)
             |> Enum.map(& &1.phx_ref)
             |> Enum.sort() ==
               Enum.sort(refs)

      assert diffs(other, 1) == [%{joins: %{}, leaves: %{"a" => %{metas: [%{phx_ref: other_ref}]}}}]
    end

    test "a dead pid's track is a join then a leave, as in Phoenix", %{topic: topic} do
      assert {:ok, ref} = Exact.track(dead_pid(), topic, "ghost", %{})
      assert Exact.list(topic) == %{}

      assert diffs(topic, 2) == [
               %{joins: %{"ghost" => %{metas: [%{phx_ref: ref}]}}, leaves: %{}},
               %{joins: %{}, leaves: %{"ghost" => %{metas: [%{phx_ref: ref}]}}}
             ]
    end

    test "interleavings over several topics, with exits: each topic's diffs in its order",
         %{topic: topic} do
      topics = for i <- 1..3, do: "#{topic}:#{i}"
      for t <- topics, do: :ok = Exact.subscribe(t)
      :rand.seed(:exsss, {1, 2, 3})
      pids = for _ <- 1..4, do: live_pid()

      {expected, _model, _pids} =
        Enum.reduce(1..300, {%{}, %{}, pids}, fn _, {expected, model, pids} ->
          step(:rand.uniform(10), Enum.random(pids), Enum.random(topics), expected, model, pids)
        end)

      for t <- topics do
        want = expected |> Map.get(t, []) |> Enum.reverse()
        assert diffs(t, length(want)) == want, "diffs of #{t}"
      end
    end
  end

  describe "keys are the terms tracked" do
    test "42 and \"42\" are two presences, listed and counted under \"42\"", %{topic: topic} do
      pid = live_pid()
      {:ok, int_ref} = Exact.track(pid, topic, 42, %{form: :integer})
      {:ok, str_ref} = Exact.track(pid, topic, "42", %{form: :string})
      {:ok, atom_ref} = Exact.track(live_pid(), topic, :"42", %{form: :atom})
      assert {:error, {:already_tracked, ^pid, ^topic, 42}} = Exact.track(pid, topic, 42, %{})

      assert %{"42" => %{metas: metas}} = Exact.list(topic)

      assert metas |> Enum.map(& &1.phx_ref) |> Enum.sort() ==
               Enum.sort([int_ref, str_ref, atom_ref])

      assert {Exact.count_users(topic), Exact.count_connections(topic)} == {1, 3}

      # Each form by its own term, as Phoenix.Tracker looks keys up.
      assert %{metas: [%{form: :integer}]} = Exact.get_by_key(topic, 42)
      assert %{metas: [%{form: :string}]} = Exact.get_by_key(topic, "42")
      assert %{metas: [%{form: :atom}]} = Exact.get_by_key(topic, :"42")
      assert Exact.get_by_key(topic, 42.0) == []

      {:ok, _} = Exact.update(pid, topic, 42, %{form: :updated})
      :ok = Exact.untrack(pid, topic, "42")
      assert %{metas: [%{form: :updated}]} = Exact.get_by_key(topic, 42)
      assert Exact.get_by_key(topic, "42") == []
      assert {Exact.count_users(topic), Exact.count_connections(topic)} == {1, 2}

      # Diffs group by the string too.
      assert [
               %{joins: %{"42" => %{metas: [%{form: :integer}]}}},
               %{joins: %{"42" => %{metas: [%{form: :string}]}}},
               %{joins: %{"42" => %{metas: [%{form: :atom}]}}},
               %{joins: %{"42" => %{metas: [%{form: :updated}]}}, leaves: %{"42" => _}},
               %{joins: %{}, leaves: %{"42" => %{metas: [%{form: :string}]}}}
             ] = diffs(topic, 5)

      :ok = Exact.untrack(pid, topic, 42)
      assert {Exact.count_users(topic), Exact.count_connections(topic)} == {1, 1}
    end

    test "a binary that looks like a tagged key is still a binary of its own", %{topic: topic} do
      pid = live_pid()
      odd = <<131, 0, 0, 0, 2, "42", 131, 97, 42>>
      {:ok, _} = Exact.track(pid, topic, odd, %{form: :odd})
      {:ok, _} = Exact.track(pid, topic, 42, %{form: :integer})

      assert %{^odd => %{metas: [%{form: :odd}]}, "42" => %{metas: [%{form: :integer}]}} =
               Exact.list(topic)

      assert Exact.count_users(topic) == 2
      assert %{metas: [%{form: :odd}]} = Exact.get_by_key(topic, odd)
      :ok = Exact.untrack(pid, topic, odd)
      assert Map.keys(Exact.list(topic)) == ["42"]
    end

    test "Drab's start/2 and stop/2 track and untrack under the same term", %{topic: topic} do
      socket = socket(topic, %{__client_id: 7})
      {:ok, _} = Exact.start(socket, topic)
      assert Map.keys(Exact.list(topic)) == ["7"]
      :ok = Exact.stop(socket, topic)
      assert Exact.list(topic) == %{}
    end
  end

  # One random operation on both Exact and a model of its presences
  # (%{{pid, topic, key} => meta with refs}), adding the diffs Phoenix
  # would send to `expected` (per topic, newest first).
  defp step(n, pid, topic, expected, model, pids) when n <= 4 do
    key = Enum.random(["k1", "k2", 3])
    meta = %{v: :rand.uniform(3)}

    case Exact.track(pid, topic, key, meta) do
      {:ok, ref} ->
        meta = Map.put(meta, :phx_ref, ref)
        diff = %{joins: %{to_string(key) => %{metas: [meta]}}, leaves: %{}}
        {push(expected, topic, diff), Map.put(model, {pid, topic, key}, meta), pids}

      {:error, {:already_tracked, ^pid, ^topic, ^key}} ->
        true = Map.has_key?(model, {pid, topic, key})
        {expected, model, pids}
    end
  end

  defp step(n, pid, topic, expected, model, pids) when n <= 7 do
    case Enum.filter(Map.keys(model), &match?({^pid, ^topic, _}, &1)) do
      [] ->
        {expected, model, pids}

      present ->
        {^pid, ^topic, key} = id = Enum.random(present)
        %{phx_ref: old_ref} = old = model[id]
        v = :rand.uniform(3)

        case Exact.update(pid, topic, key, %{v: v}) do
          {:ok, ^old_ref} ->
            {expected, model, pids}

          {:ok, ref} ->
            new = %{v: v, phx_ref: ref, phx_ref_prev: old.phx_ref}
            listed = to_string(key)
            diff = %{joins: %{listed => %{metas: [new]}}, leaves: %{listed => %{metas: [old]}}}
            {push(expected, topic, diff), Map.put(model, id, new), pids}
        end
    end
  end

  defp step(9, pid, topic, expected, model, pids) do
    key = Enum.random(["k1", "k2", 3])
    :ok = Exact.untrack(pid, topic, key)

    case Map.pop(model, {pid, topic, key}) do
      {nil, model} ->
        {expected, model, pids}

      {meta, model} ->
        diff = %{joins: %{}, leaves: %{to_string(key) => %{metas: [meta]}}}
        {push(expected, topic, diff), model, pids}
    end
  end

  defp step(_exit, pid, _topic, expected, model, pids) do
    ref = Process.monitor(pid)
    Process.exit(pid, :kill)
    assert_receive {:DOWN, ^ref, _, _, _}
    {gone, model} = Enum.split_with(model, fn {{owner, _, _}, _} -> owner == pid end)

    # An exit reaches the table through a monitor of its own (the NIF's, or
    # the sidecar's monitor pool), not through this process: operations
    # after it are ordered after it only once it was applied.
    for {{_, topic, _}, _} <- gone do
      left = Enum.count(model, &match?({{_, ^topic, _}, _}, &1))
      wait_until(fn -> Exact.count_connections(topic) == left end)
    end

    expected =
      gone
      |> Enum.group_by(fn {{_, topic, _}, _} -> topic end)
      |> Enum.reduce(expected, fn {topic, presences}, expected ->
        leaves =
          Enum.reduce(presences, %{}, fn {{_, _, key}, meta}, leaves ->
            Map.update(leaves, to_string(key), %{metas: [meta]}, &%{metas: [meta | &1.metas]})
          end)

        push(expected, topic, %{joins: %{}, leaves: leaves})
      end)

    {expected, Map.new(model), [live_pid() | List.delete(pids, pid)]}
  end

  defp push(expected, topic, diff), do: Map.update(expected, topic, [diff], &[diff | &1])
end
