defmodule Bench.View do
  @moduledoc false
  # What a subscriber knows of presences, rebuilt from presence_diff
  # broadcasts as the phoenix.js client does: joins add metas, leaves remove
  # them. Kept as a count of metas and an order-independent digest (a sum of
  # hashes) of {topic, key, phx_ref}, so that a view costs a few integers,
  # thousands of subscribers can each keep one, and comparing a view with
  # list/1 is O(1) once the list is digested. A view made with
  # `digest?: false` keeps the count only (a tenth of the work per meta).
  defstruct count: 0, digest: 0, diffs: 0, digest?: true

  def new(opts \\ []), do: %__MODULE__{digest?: Keyword.get(opts, :digest?, true)}

  def apply_diff(view, topic, %{joins: joins, leaves: leaves}) do
    view = view |> add(topic, joins, 1) |> add(topic, leaves, -1)
    %{view | diffs: view.diffs + 1}
  end

  @doc "The view that `list/1` of each topic gives."
  def of_lists(adapter, topics) do
    Enum.reduce(topics, new(), fn topic, view -> add(view, topic, adapter.list(topic), 1) end)
  end

  @doc "Same presences (diff counts aside); a count-only view compares by count."
  def same?(%{digest?: false} = a, b), do: a.count == b.count
  def same?(a, b), do: a.count == b.count and a.digest == b.digest

  defp add(%{digest?: false} = view, _topic, presences, sign) do
    metas = :maps.fold(fn _key, %{metas: metas}, sum -> sum + length(metas) end, 0, presences)
    %{view | count: view.count + sign * metas}
  end

  defp add(view, topic, presences, sign) do
    :maps.fold(
      fn key, %{metas: metas}, view ->
        List.foldl(metas, view, fn %{phx_ref: ref}, %{count: count, digest: digest} = view ->
          %{view | count: count + sign, digest: digest + sign * :erlang.phash2({topic, key, ref})}
        end)
      end,
      view,
      presences
    )
  end
end

defmodule Bench.Subscriber do
  @moduledoc false
  # A process subscribed to some topics, as a channel or a dashboard would
  # be, keeping a view of them from the diffs it receives.
  alias Bench.{Harness, View}

  def start(adapter, topics) do
    parent = self()

    # Its mailbox off the heap: at 1M presences, diffs queue faster than it
    # folds them, and every GC would copy the whole queue (a 500 ms pause
    # of a scheduler, the harness's own, counted against the system).
    pid =
      :erlang.spawn_opt(
        fn ->
          Process.put(:bench_role, "subscriber")
          Enum.each(topics, fn topic -> :ok = adapter.subscribe(topic) end)
          send(parent, {:subscribed, self()})
          loop(View.new(), nil, nil)
        end,
        message_queue_data: :off_heap
      )

    receive do
      {:subscribed, ^pid} -> pid
    after
      60_000 -> Harness.fail!("subscriber did not subscribe")
    end
  end

  def stop(pid), do: Process.exit(pid, :kill)

  @doc """
  Waits until the subscriber's view holds `count` metas. Returns the view
  and the µs from `t0` until the subscriber processed the diff that made it
  so: when the last diff reached it.
  """
  def await(pid, count, t0, timeout) do
    ref = make_ref()
    send(pid, {:await, self(), ref, count})

    receive do
      {^ref, view, reached_at} ->
        {view, System.convert_time_unit(reached_at - t0, :native, :microsecond)}
    after
      timeout ->
        Harness.fail!("subscriber view did not reach #{count} presences within #{timeout} ms")
    end
  end

  defp loop(view, changed_at, waiter) do
    receive do
      %{event: "presence_diff", topic: topic, payload: payload} ->
        view = View.apply_diff(view, topic, payload)
        at = System.monotonic_time()
        loop(view, at, reply(waiter, view, at))

      {:await, from, ref, count} ->
        loop(view, changed_at, reply({from, ref, count}, view, changed_at))
    end
  end

  defp reply({from, ref, count}, %View{count: count} = view, at) do
    send(from, {ref, view, at || System.monotonic_time()})
    nil
  end

  defp reply(waiter, _view, _at), do: waiter
end

defmodule Bench.StormMember do
  @moduledoc false
  # One process of a join storm: it subscribes to the topic, waits for the
  # start signal, tracks itself, and keeps a view of the topic from the diffs.
  # It tells the coordinator when its view first holds all `n` presences.
  alias Bench.View

  def run(adapter, topic, key, n, coordinator, view_opts) do
    :ok = adapter.subscribe(topic)
    send(coordinator, {:subscribed, self()})

    receive do
      :go -> {:ok, _} = adapter.track(self(), topic, key, %{online_at: 0})
    end

    loop(View.new(view_opts), n, coordinator)
  end

  @doc false
  def loop(view, n, coordinator) do
    receive do
      %{event: "presence_diff", topic: topic, payload: payload} ->
        before = view.count
        view = View.apply_diff(view, topic, payload)

        if view.count == n and before != n,
          do: send(coordinator, {:converged, self(), System.monotonic_time()})

        # A big diff grows the heap, and a GC does not shrink it back: 20k
        # idle members would each keep the room for a 20k-presence diff
        # (~4 MB, ~80 GB in all). Hibernating leaves the smallest heap.
        if map_size(payload.joins) + map_size(payload.leaves) > 1_000,
          do: :erlang.hibernate(__MODULE__, :loop, [view, n, coordinator]),
          else: loop(view, n, coordinator)

      {:report, from} ->
        send(from, {:view, self(), view})
        loop(view, n, coordinator)
    end
  end
end

defmodule Bench.ChurnSubscriber do
  @moduledoc false
  # A subscriber to one topic under churn, measuring how long each change
  # took to reach it. A join carries the time of its track or update in its
  # meta (`t`, a monotonic time), so its latency is known on arrival; a leave
  # is kept as {phx_ref, arrival} and matched afterwards with the time at
  # which a churn worker removed that ref (untrack or update). It also keeps
  # a view of the topic, checked against list/1 at the end, and the arrival
  # time of every presence_diff.
  alias Bench.{Harness, Latency, View}

  def start(adapter, topic, histogram) do
    parent = self()

    pid =
      spawn(fn ->
        Process.put(:bench_role, "churn subscriber")
        :ok = adapter.subscribe(topic)
        send(parent, {:subscribed, self()})
        loop(%{view: View.new(), histogram: histogram, arrivals: [], leaves: [], max_us: 0}, nil)
      end)

    receive do
      {:subscribed, ^pid} -> pid
    after
      60_000 -> Harness.fail!("churn subscriber did not subscribe")
    end
  end

  @doc """
  Waits until the subscriber's view is `expected` (the topic's list/1, once
  every diff is out), then returns what it measured: the greatest join
  latency in µs, the leaves as [{phx_ref, arrival}], the arrival of every
  diff (latest first), and its view.
  """
  def report(pid, expected, timeout) do
    ref = make_ref()
    send(pid, {:report, self(), ref, expected})

    receive do
      {^ref, state} -> state
    after
      timeout ->
        Harness.fail!("a churn subscriber's view did not reach list/1 within #{timeout} ms")
    end
  end

  defp loop(state, waiter) do
    receive do
      %{event: "presence_diff", topic: topic, payload: payload} ->
        at = System.monotonic_time()

        state = %{
          state
          | view: View.apply_diff(state.view, topic, payload),
            arrivals: [at | state.arrivals],
            leaves: leaves(payload.leaves, at, state.leaves),
            max_us: joins(payload.joins, at, state.histogram, state.max_us)
        }

        loop(state, reply(waiter, state))

      {:report, from, ref, expected} ->
        loop(state, reply({from, ref, expected}, state))
    end
  end

  defp reply({from, ref, expected} = waiter, state) do
    if View.same?(state.view, expected) do
      send(from, {ref, Map.delete(state, :histogram)})
      nil
    else
      waiter
    end
  end

  defp reply(nil, _state), do: nil

  # Joins of the population set up before the churn have no time.
  defp joins(joins, at, histogram, max_us) do
    :maps.fold(
      fn _key, %{metas: metas}, max_us ->
        List.foldl(metas, max_us, fn
          %{t: t}, max_us when is_integer(t) ->
            us = System.convert_time_unit(at - t, :native, :microsecond)
            Latency.add(histogram, us)
            max(us, max_us)

          _meta, max_us ->
            max_us
        end)
      end,
      max_us,
      joins
    )
  end

  defp leaves(leaves, at, acc) do
    :maps.fold(
      fn _key, %{metas: metas}, acc ->
        List.foldl(metas, acc, fn %{phx_ref: ref}, acc -> [{ref, at} | acc] end)
      end,
      acc,
      leaves
    )
  end
end
