defmodule Drab.Presence.ModelProperTest do
  # PropEr (Debian's erlang-proper) drives random track, untrack, update and
  # process exits through the backend under test (Drab.PresenceCase.backend/0)
  # and checks the table against a plain map: counts, list, get_by_key, and
  # two subscriber views rebuilt from the diffs per topic. The model lists
  # every topic after every step, as busy readers would: a subscriber that
  # never lists must still hear each ref join once, before its leave; one
  # that resyncs from list/1 now and then (as phoenix.js does from
  # presence_state on a rejoin) must still converge.
  use ExUnit.Case, async: true

  @table Drab.PresenceCase.backend_module()

  @topics ["lobby", "room"]
  @keys ["ann", "bob", "cy"]
  @owners 0..3

  setup_all do
    case Code.ensure_loaded(:proper) do
      {:module, :proper} -> :ok
      _ -> raise "PropEr is missing: apt-get install erlang-proper (the test command does this)"
    end
  end

  test "the table agrees with a model" do
    property = :proper.forall(ops_gen(), &run_ops/1)
    assert :proper.quickcheck(property, [{:numtests, 150}, {:to_file, :user}, :quiet]) == true
  end

  defp ops_gen do
    owner = :proper_types.integer(0, 3)
    topic = :proper_types.elements(@topics)
    key = :proper_types.elements(@keys)
    meta = :proper_types.integer(0, 2)

    op =
      :proper_types.frequency([
        {4, :proper_types.tuple([:proper_types.exactly(:track), owner, topic, key, meta])},
        {2, :proper_types.tuple([:proper_types.exactly(:untrack), owner, topic, key])},
        {2, :proper_types.tuple([:proper_types.exactly(:update), owner, topic, key, meta])},
        {1, :proper_types.tuple([:proper_types.exactly(:exit), owner])},
        {2, :proper_types.exactly(:drain)},
        {1, :proper_types.tuple([:proper_types.exactly(:resync), topic])}
      ])

    :proper_types.list(op)
  end

  defp run_ops(ops) do
    table = @table.new(__MODULE__, max_meta_bytes: 1_024)
    owners = Map.new(@owners, &{&1, spawn_owner()})
    views = Map.new(@topics, &{&1, %{pure: %{}, listing: %{}}})
    state = %{table: table, owners: owners, model: %{}, views: views}

    try do
      state = Enum.reduce(ops, state, &step/2) |> drain()

      Enum.all?(@topics, fn topic ->
        listed = listed(state, topic)
        state.views[topic] == %{pure: listed, listing: listed}
      end)
    after
      Enum.each(state.owners, fn {_, pid} -> Process.exit(pid, :kill) end)
      # A sidecar table is an OS process: end it with the run.
      if function_exported?(@table, :close, 1), do: @table.close(table)
    end
  end

  defp step({:track, o, topic, key, meta}, state) do
    result = @table.track(state.table, state.owners[o], topic, key, %{v: meta})
    model_key = {o, topic, key}

    state =
      if Map.has_key?(state.model, model_key) do
        {:error, :already_tracked} = result
        state
      else
        {:ok, _ref} = result
        put_in(state.model[model_key], meta)
      end

    check!(state)
  end

  defp step({:untrack, o, topic, key}, state) do
    :ok = @table.untrack(state.table, state.owners[o], topic, key)
    check!(%{state | model: Map.delete(state.model, {o, topic, key})})
  end

  defp step({:update, o, topic, key, meta}, state) do
    result = @table.update(state.table, state.owners[o], topic, key, %{v: meta}, nil)

    case Map.fetch(state.model, {o, topic, key}) do
      :error ->
        {:error, :not_tracked} = result
        check!(state)

      {:ok, _old} ->
        {:ok, _ref} = result
        check!(put_in(state.model[{o, topic, key}], meta))
    end
  end

  defp step({:exit, o}, state) do
    old = state.owners[o]
    monitor = Process.monitor(old)
    Process.exit(old, :kill)
    receive do: ({:DOWN, ^monitor, _, _, _} -> :ok)
    # The table's own monitor fires independently of ours: wait for it.
    wait_for_owners(
      state.table,
      owners_with_presences(state.model) - if(has_presence?(state.model, o), do: 1, else: 0)
    )

    model = for {{owner, _, _}, _} = entry <- state.model, owner != o, into: %{}, do: entry
    check!(%{state | model: model, owners: Map.put(state.owners, o, spawn_owner())})
  end

  defp step(:drain, state), do: drain(state)

  defp step({:resync, topic}, state),
    do: put_in(state.views[topic].listing, listed(state, topic))

  # Takes the pending diffs and applies every part, as phoenix.js does:
  # joins, then leaves by phx_ref; each part is acknowledged once applied.
  defp drain(state) do
    {_queued, 0} = @table.take_diffs(state.table, 1_000)
    %{state | views: apply_parts(state.table, state.views)}
  end

  defp apply_parts(table, views) do
    case @table.next_part(table) do
      :none ->
        views

      {id, topic, joins, leaves, _age_us} ->
        :ok = @table.ack_part(table, id)
        apply_parts(table, apply_part(views, topic, joins, leaves))
    end
  end

  defp apply_part(views, topic, joins, leaves) do
    %{pure: pure, listing: listing} = views[topic]
    joined = for {key, %{metas: metas}} <- joins, meta <- metas, do: {meta.phx_ref, {key, meta}}
    left = for {_key, %{metas: metas}} <- leaves, meta <- metas, do: meta.phx_ref

    for {phx_ref, _} <- joined, Map.has_key?(pure, phx_ref) do
      raise "a subscriber that never listed heard #{phx_ref} join twice"
    end

    pure = Map.merge(pure, Map.new(joined))

    for phx_ref <- left, not Map.has_key?(pure, phx_ref) do
      raise "a subscriber that never listed heard #{phx_ref} leave, never joined"
    end

    # A listing view may hear a leave of a ref it never had (listed to
    # another client before its join went out); phoenix.js ignores it, as
    # Map.drop/2 does.
    listing = listing |> Map.merge(Map.new(joined)) |> Map.drop(left)
    Map.put(views, topic, %{pure: Map.drop(pure, left), listing: listing})
  end

  defp check!(state) do
    for topic <- @topics do
      expected = for {{_o, ^topic, key}, meta} <- state.model, do: {key, meta}
      listed = listed(state, topic) |> Map.values() |> Enum.map(fn {key, %{v: v}} -> {key, v} end)
      true = Enum.sort(listed) == Enum.sort(expected)
      users = expected |> Enum.map(&elem(&1, 0)) |> Enum.uniq() |> length()
      true = @table.counts(state.table, topic) == {users, length(expected)}

      for key <- @keys do
        metas = for {^key, meta} <- expected, do: meta

        case @table.get_by_key(state.table, topic, key) do
          [] -> [] = metas
          %{^key => %{metas: got}} -> true = Enum.sort(Enum.map(got, & &1.v)) == Enum.sort(metas)
        end
      end
    end

    state
  end

  defp listed(state, topic) do
    for {key, %{metas: metas}} <- @table.list(state.table, topic), meta <- metas, into: %{} do
      {meta.phx_ref, {key, meta}}
    end
  end

  defp has_presence?(model, o), do: Enum.any?(model, fn {{owner, _, _}, _} -> owner == o end)

  defp owners_with_presences(model),
    do: model |> Map.keys() |> Enum.map(&elem(&1, 0)) |> Enum.uniq() |> length()

  defp wait_for_owners(table, count, tries \\ 200) do
    cond do
      @table.stats(table).owners == count -> :ok
      tries == 0 -> raise "table still has #{@table.stats(table).owners} owners, expected #{count}"
      true -> Process.sleep(1) && wait_for_owners(table, count, tries - 1)
    end
  end

  defp spawn_owner, do: spawn(fn -> Process.sleep(:infinity) end)
end
