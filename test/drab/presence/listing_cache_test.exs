defmodule Drab.Presence.ListingCacheTest do
  # A topic listed with 128 presences or more keeps its listing as a term in
  # the NIF, refreshed from the keys that changed since the last list (see
  # native/presence_nif/src/listing.rs). Whatever happens between two lists
  # (writes, owner exits, more changes than the refresh takes, the topic
  # emptied and grown again, integer keys listed with string ones), list/1
  # must show exactly what is tracked, and a caller's own write must be in
  # its next list. Runs on both backends; the sidecar keeps no listing, so
  # there it checks the same contract without the cache. Random choices
  # follow ExUnit's seed: `mix test --seed N` replays a failure.
  use Drab.PresenceCase, async: true

  defmodule Cached do
    use Drab.Presence,
      otp_app: :drab_presence,
      backend: Drab.PresenceCase.backend(),
      diff_window: 10
  end

  @owners 8

  setup do
    start_supervised!(Cached)
    owners = Map.new(1..@owners, &{&1, live_pid()})
    %{state: %{owners: owners, model: %{}}}
  end

  test "a large topic's list/1 equals the model through random writes and exits",
       %{topic: topic, state: state} do
    state = grow(state, topic, 300)
    assert_listed!(state, topic)

    state =
      Enum.reduce(1..200, state, fn _, state ->
        state = Enum.reduce(1..:rand.uniform(12), state, &random_op(&2, topic, &1))
        assert_listed!(state, topic)
        state
      end)

    # More changes between two lists than a refresh takes: built again.
    state = grow(state, topic, 1_600)
    assert_listed!(state, topic)
    assert map_size(state.model) == 1_600
  end

  test "a topic emptied and grown again lists only what is tracked now",
       %{topic: topic, state: state} do
    state = grow(state, topic, 200)
    assert_listed!(state, topic)

    state =
      Enum.reduce(Map.keys(state.owners), state, fn owner, state ->
        state = kill(state, topic, owner)
        assert_listed!(state, topic)
        state
      end)

    assert Cached.list(topic) == %{}
    state = grow(state, topic, 150)
    assert_listed!(state, topic)
  end

  test "integer keys are listed with the string keys they print as",
       %{topic: topic, state: state} do
    state = grow(state, topic, 200)
    %{owners: %{1 => one, 2 => two}} = state
    {:ok, _} = Cached.track(one, topic, 7, %{o: 1, k: 7, v: 0})
    {:ok, _} = Cached.track(two, topic, "7", %{o: 2, k: "7", v: 0})
    state = put_in(state.model[{1, 7}], 0)
    state = put_in(state.model[{2, "7"}], 0)
    assert_listed!(state, topic)

    :ok = Cached.untrack(one, topic, 7)
    state = %{state | model: Map.delete(state.model, {1, 7})}
    assert %{"7" => %{metas: [%{k: "7"}]}} = Cached.list(topic)
    assert_listed!(state, topic)
  end

  test "each writer sees its own writes in its next list while others list and write",
       %{topic: topic, state: state} do
    _ = grow(state, topic, 300)
    listed = Cached.list(topic)
    parent = self()

    listers =
      for _ <- 1..2 do
        spawn_link(fn -> list_until_stopped(topic, parent) end)
      end

    writers =
      for writer <- 1..3 do
        owner = live_pid()
        Task.async(fn -> write_and_read_back(topic, writer, owner, 150) end)
      end

    finals = Enum.map(writers, &Task.await(&1, 60_000))
    Enum.each(listers, &send(&1, :stop))
    assert Enum.all?(listers, fn _ -> assert_receive {:lists, n} when n > 0, 5_000 end)

    # Each writer leaves its last presence tracked: the listing has them
    # and what grow/3 tracked.
    now = Cached.list(topic)
    for {writer, key, v} <- finals, do: assert(%{metas: [%{v: ^v}]} = now[key], "writer #{writer}")
    assert Map.drop(now, Enum.map(finals, &elem(&1, 1))) == listed
  end

  # Writes on behalf of `owner`, as a channel process's helper would.
  defp write_and_read_back(topic, writer, owner, rounds) do
    Enum.reduce(1..rounds, nil, fn round, _ ->
      key = "w#{writer}-#{rem(round, 5)}"
      {:ok, _} = Cached.track(owner, topic, key, %{v: round})
      assert %{metas: [%{v: ^round}]} = Cached.list(topic)[key]
      {:ok, _} = Cached.update(owner, topic, key, %{v: -round})
      assert %{metas: [%{v: v}]} = Cached.list(topic)[key]
      assert v == -round

      if round < rounds do
        :ok = Cached.untrack(owner, topic, key)
        refute Map.has_key?(Cached.list(topic), key)
      end

      {writer, key, -round}
    end)
  end

  defp list_until_stopped(topic, parent, lists \\ 0) do
    receive do
      :stop -> send(parent, {:lists, lists})
    after
      0 ->
        _ = Cached.list(topic)
        list_until_stopped(topic, parent, lists + 1)
    end
  end

  ## The model: {owner, key} => v, each listed as %{o: owner, k: key, v: v}
  ## under to_string(key).

  defp grow(state, topic, size) do
    if map_size(state.model) >= size do
      state
    else
      grow(track(state, topic, :rand.uniform(@owners), random_key()), topic, size)
    end
  end

  defp random_key do
    n = :rand.uniform(2_000)
    # Integer keys now and then, some printing as a string key in use.
    if rem(n, 7) == 0, do: div(n, 7), else: "#{n}"
  end

  defp random_op(state, topic, _) do
    case :rand.uniform(10) do
      n when n <= 4 ->
        track(state, topic, :rand.uniform(@owners), random_key())

      n when n <= 6 ->
        case Map.keys(state.model) do
          [] ->
            state

          keys ->
            {owner, key} = Enum.random(keys)
            :ok = Cached.untrack(state.owners[owner], topic, key)
            %{state | model: Map.delete(state.model, {owner, key})}
        end

      n when n <= 9 ->
        case Map.keys(state.model) do
          [] ->
            state

          keys ->
            {owner, key} = Enum.random(keys)
            v = :rand.uniform(1_000)
            meta = %{o: owner, k: key, v: v}
            {:ok, _} = Cached.update(state.owners[owner], topic, key, meta)
            put_in(state.model[{owner, key}], v)
        end

      10 ->
        kill(state, topic, :rand.uniform(@owners))
    end
  end

  defp track(state, topic, owner, key) do
    v = :rand.uniform(1_000)

    case Cached.track(state.owners[owner], topic, key, %{o: owner, k: key, v: v}) do
      {:ok, _} -> put_in(state.model[{owner, key}], v)
      {:error, {:already_tracked, _, _, _}} -> state
    end
  end

  defp kill(state, topic, owner) do
    Process.exit(state.owners[owner], :kill)
    model = for {{o, _}, _} = entry <- state.model, o != owner, into: %{}, do: entry
    wait_until(fn -> Cached.count_connections(topic) == map_size(model) end)
    %{state | model: model, owners: Map.put(state.owners, owner, live_pid())}
  end

  defp assert_listed!(state, topic) do
    expected = for {{owner, key}, v} <- state.model, do: {to_string(key), %{o: owner, k: key, v: v}}

    listed =
      for {key, %{metas: metas}} <- Cached.list(topic), meta <- metas do
        {key, Map.take(meta, [:o, :k, :v])}
      end

    assert Enum.sort(listed) == Enum.sort(expected),
           "listed #{length(listed)} presences, the model has #{length(expected)}; " <>
             "missing #{inspect(Enum.take(expected -- listed, 3))}, " <>
             "extra #{inspect(Enum.take(listed -- expected, 3))}"
  end
end
