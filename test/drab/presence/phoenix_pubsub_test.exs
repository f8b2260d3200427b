defmodule Drab.Presence.PhoenixPubSubTest do
  # Drab.Presence on a real Phoenix.PubSub, side by side with a real
  # Phoenix.Presence on the same server: the same operations must broadcast
  # the same %Phoenix.Socket.Broadcast{} diffs and list the same presences,
  # phx_ref values aside. Excluded unless Phoenix is on the code path.
  use Drab.PresenceCase, async: true

  @moduletag :phoenix

  @pubsub __MODULE__.PubSub
  # Matched as a plain map: the struct does not exist when Phoenix is absent.
  @broadcast Phoenix.Socket.Broadcast
  @compile {:no_warn_undefined, [Phoenix.PubSub, __MODULE__.PhoenixSide]}

  # The same fetch/2 on both sides, to show it shapes diffs alike.
  defmodule Fetch do
    def fetch(presences) do
      Map.new(presences, fn {key, presence} -> {key, Map.put(presence, :name, "user #{key}")} end)
    end
  end

  defmodule DrabSide do
    use Drab.Presence,
      otp_app: :drab_presence,
      pubsub_server: Drab.Presence.PhoenixPubSubTest.PubSub,
      diff_window: 20

    def fetch(_topic, presences), do: Fetch.fetch(presences)
  end

  defmodule DrabExact do
    use Drab.Presence,
      otp_app: :drab_presence,
      pubsub_server: Drab.Presence.PhoenixPubSubTest.PubSub,
      diff_window: 0

    def fetch(_topic, presences), do: Fetch.fetch(presences)
  end

  if Code.ensure_loaded?(Phoenix.Presence) do
    defmodule PhoenixSide do
      use Phoenix.Presence,
        otp_app: :drab_presence,
        pubsub_server: Drab.Presence.PhoenixPubSubTest.PubSub

      def fetch(_topic, presences), do: Fetch.fetch(presences)
    end
  end

  setup_all do
    {:ok, _} = Application.ensure_all_started(:phoenix_pubsub)
    :ok
  end

  setup %{topic: topic} do
    # phoenix_pubsub 2.x is a supervisor itself; 1.x (Phoenix 1.4, as Drab
    # 0.10 pins it) starts one of its adapters.
    pubsub =
      if function_exported?(Phoenix.PubSub, :child_spec, 1),
        do: Phoenix.PubSub,
        else: Phoenix.PubSub.PG2

    start_supervised!({pubsub, name: @pubsub})
    start_supervised!(DrabSide)
    start_supervised!(DrabExact)
    start_supervised!(__MODULE__.PhoenixSide)

    # One topic per side: the two modules share the PubSub server.
    topics = %{DrabSide => topic <> ":drab", __MODULE__.PhoenixSide => topic <> ":phoenix"}
    for {_module, topic} <- topics, do: :ok = Phoenix.PubSub.subscribe(@pubsub, topic)
    {:ok, topics: topics}
  end

  test "diffs arrive as Phoenix.Socket.Broadcast structs through Phoenix.PubSub", %{topics: topics} do
    topic = topics[DrabSide]
    pid = live_pid()
    {:ok, ref} = DrabSide.track(pid, topic, "alice", %{device: "phone"})

    assert_receive %{
                     __struct__: @broadcast,
                     topic: ^topic,
                     event: "presence_diff",
                     payload: %{
                       joins: %{
                         "alice" => %{
                           metas: [%{device: "phone", phx_ref: ^ref}],
                           name: "user alice"
                         }
                       },
                       leaves: leaves
                     }
                   },
                   1_000

    assert leaves == %{}
    refute_received %{event: "presence_diff", topic: ^topic}
  end

  test "the same operations give the same diffs as Phoenix.Presence", %{topics: topics} do
    [a, b, c] = for _ <- 1..3, do: live_pid()
    s = %{topics: topics, labels: %{}}

    Enum.reduce(
      [
        {:track, a, "alice", %{device: "phone", n: 0}},
        {:track, b, "alice", %{device: "laptop", n: 0}},
        {:track, a, "bob", %{device: "phone"}},
        {:track, c, 42, %{list: [1, 2], nested: %{ok: true}}},
        {:update, a, "alice", %{device: "phone", n: 1}},
        {:update, a, "alice", &Map.update!(&1, :n, fn n -> n + 1 end)},
        {:update, b, "alice", &Map.put(&1, :away, true)},
        {:untrack, b, "alice"},
        {:untrack, c, 42},
        {:track, c, "bob", %{device: "tablet"}},
        {:kill, a},
        {:kill, c}
      ],
      s,
      &same_diff(&2, &1)
    )

    refute_receive %{event: "presence_diff"}, 50
  end

  test "with diff_window: 0, operations back to back give Phoenix's diffs, in order",
       %{topics: topics} do
    topics = %{
      DrabExact => topics[DrabSide] <> ":exact",
      __MODULE__.PhoenixSide => topics[__MODULE__.PhoenixSide]
    }

    :ok = Phoenix.PubSub.subscribe(@pubsub, topics[DrabExact])
    [a, b, c] = for _ <- 1..3, do: live_pid()

    ops = [
      {:track, a, "alice", %{device: "phone", n: 0}},
      {:track, b, "alice", %{device: "laptop", n: 0}},
      {:track, a, "bob", %{device: "phone"}},
      {:untrack, a, "bob"},
      {:track, c, 42, %{list: [1, 2]}},
      {:update, a, "alice", %{device: "phone", n: 1}},
      {:update, a, "alice", &Map.update!(&1, :n, fn n -> n + 1 end)},
      {:track, a, "bob", %{device: "phone", again: true}},
      {:untrack, b, "alice"},
      {:untrack, c, 42}
    ]

    # No waiting between operations: nothing may merge or cancel.
    labels =
      for {module, topic} <- topics, op <- ops, reduce: %{} do
        labels ->
          case run(module, topic, op) do
            {:ok, ref} -> Map.put(labels, ref, {:ref, inspect(op)})
            :ok -> labels
          end
      end

    Process.exit(a, :kill)
    s = %{labels: labels}

    [exact, phoenix] =
      for module <- [DrabExact, __MODULE__.PhoenixSide] do
        for payload <- all_diffs(topics[module]) do
          %{joins: relabel(payload.joins, s), leaves: relabel(payload.leaves, s)}
        end
      end

    assert length(phoenix) == length(ops) + 1
    assert exact == phoenix
  end

  test "documented differences: no-op updates and changes within one diff window",
       %{topics: topics} do
    pid = live_pid()

    for {module, topic} <- topics do
      {:ok, _} = module.track(pid, topic, "alice", %{n: 0})
      assert_diff(topic)
      {:ok, _} = module.update(pid, topic, "alice", %{n: 0})
      {:ok, _} = module.track(pid, topic, "bob", %{})
      :ok = module.untrack(pid, topic, "bob")
    end

    # Phoenix.Presence sends all three; Drab.Presence none of them.
    phoenix_topic = topics[__MODULE__.PhoenixSide]
    for _ <- 1..3, do: assert_diff(phoenix_topic)
    drab_topic = topics[DrabSide]
    refute_receive %{event: "presence_diff", topic: ^drab_topic}, 100
  end

  # Runs `op` on both sides, one at a time so that no diff window merges two
  # operations, and compares what each broadcasts and lists.
  defp same_diff(s, {:kill, pid}) do
    Process.exit(pid, :kill)
    compare(s)
  end

  defp same_diff(s, op) do
    s =
      Enum.reduce(s.topics, s, fn {module, topic}, s ->
        case run(module, topic, op) do
          {:ok, ref} -> put_in(s.labels[ref], {:ref, inspect(op)})
          :ok -> s
        end
      end)

    compare(s)
  end

  # Every presence_diff on `topic` until it has been quiet for 200 ms.
  defp all_diffs(topic, acc \\ []) do
    receive do
      %{__struct__: @broadcast, topic: ^topic, event: "presence_diff", payload: payload} ->
        all_diffs(topic, [payload | acc])
    after
      200 -> Enum.reverse(acc)
    end
  end

  defp run(module, topic, {:track, pid, key, meta}), do: module.track(pid, topic, key, meta)
  defp run(module, topic, {:update, pid, key, meta}), do: module.update(pid, topic, key, meta)
  defp run(module, topic, {:untrack, pid, key}), do: module.untrack(pid, topic, key)

  defp compare(s) do
    [drab, phoenix] =
      for module <- [DrabSide, __MODULE__.PhoenixSide] do
        topic = s.topics[module]

        assert_receive %{__struct__: @broadcast, topic: ^topic, event: "presence_diff"} = msg,
                       1_000

        %{joins: joins, leaves: leaves} = msg.payload
        {%{joins: relabel(joins, s), leaves: relabel(leaves, s)}, relabel(module.list(topic), s)}
      end

    assert drab == phoenix
    s
  end

  # phx_refs differ between the two, so each is replaced by the operation
  # that returned it; metas are then sorted, their order being unspecified.
  defp relabel(presences, s) do
    Map.new(presences, fn {key, presence} ->
      metas =
        presence.metas
        |> Enum.map(fn meta ->
          Map.new(meta, fn
            {field, ref} when field in [:phx_ref, :phx_ref_prev] ->
              {field, Map.get(s.labels, ref, {:unknown_ref, ref})}

            other ->
              other
          end)
        end)
        |> Enum.sort()

      {key, %{presence | metas: metas}}
    end)
  end
end
