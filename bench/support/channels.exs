defmodule Bench.ClientView do
  @moduledoc false
  # What a phoenix.js `Presence` object holds, built as phoenix.js builds it
  # (assets/js/phoenix/presence.js, 1.7): "presence_state" through
  # `syncState`, "presence_diff" through `syncDiff`, and diffs that arrive
  # before the first state kept pending and applied after it
  # (`pendingDiffs`). Presences are as JSON decodes them (string keys).
  # It also counts the metas it holds, so that a replay can tell which
  # frame changed it, and digests them (every {key, meta}) for comparing
  # with list/1 without sending the listing to every client.
  @compile {:no_warn_undefined, Jason}
  defstruct state: %{}, count: 0, synced?: false, pending: []

  def new, do: %__MODULE__{}

  @doc "A presence_state: `syncState`, then the pending diffs."
  def receive_state(view, new_state) do
    view = sync_state(view, new_state)
    view = view.pending |> Enum.reverse() |> Enum.reduce(view, &sync_diff(&2, &1))
    %{view | synced?: true, pending: []}
  end

  @doc "A presence_diff: `syncDiff`, or pending until the first state."
  def receive_diff(%{synced?: false} = view, diff), do: %{view | pending: [diff | view.pending]}
  def receive_diff(view, diff), do: sync_diff(view, diff)

  defp sync_state(view, new_state) do
    leaves =
      for {key, presence} <- view.state,
          not Map.has_key?(new_state, key),
          into: %{},
          do: {key, presence}

    {joins, leaves} =
      Enum.reduce(new_state, {%{}, leaves}, fn {key, %{"metas" => new_metas} = presence},
                                               {joins, leaves} ->
        case view.state do
          %{^key => %{"metas" => metas} = current} ->
            new_refs = refs(new_metas)
            current_refs = refs(metas)
            joined = Enum.reject(new_metas, &(&1["phx_ref"] in current_refs))
            left = Enum.reject(metas, &(&1["phx_ref"] in new_refs))

            joins =
              if joined == [], do: joins, else: Map.put(joins, key, %{presence | "metas" => joined})

            leaves =
              if left == [], do: leaves, else: Map.put(leaves, key, %{current | "metas" => left})

            {joins, leaves}

          _ ->
            {Map.put(joins, key, presence), leaves}
        end
      end)

    sync_diff(view, %{"joins" => joins, "leaves" => leaves})
  end

  defp sync_diff(view, %{"joins" => joins, "leaves" => leaves}) do
    view =
      Enum.reduce(joins, view, fn {key, %{"metas" => joined} = presence}, view ->
        current = current_metas(view, key)
        joined_refs = refs(joined)
        kept = Enum.reject(current, &(&1["phx_ref"] in joined_refs))
        metas = kept ++ joined

        %{
          view
          | state: Map.put(view.state, key, %{presence | "metas" => metas}),
            count: view.count + length(metas) - length(current)
        }
      end)

    Enum.reduce(leaves, view, fn {key, %{"metas" => left}}, view ->
      case view.state do
        %{^key => %{"metas" => metas} = current} ->
          left_refs = refs(left)
          kept = Enum.reject(metas, &(&1["phx_ref"] in left_refs))
          count = view.count - length(metas) + length(kept)

          if kept == [],
            do: %{view | state: Map.delete(view.state, key), count: count},
            else: %{
              view
              | state: Map.put(view.state, key, %{current | "metas" => kept}),
                count: count
            }

        _ ->
          view
      end
    end)
  end

  defp current_metas(view, key) do
    case view.state do
      %{^key => %{"metas" => metas}} -> metas
      _ -> []
    end
  end

  defp refs(metas), do: Enum.map(metas, & &1["phx_ref"])

  @doc """
  {metas, digest} of the view: a sum of hashes of every {key, meta}, which
  does not depend on the order of keys or metas.
  """
  def digest(view), do: digest_state(view.state)

  @doc """
  {metas, digest} of a listing, as `digest/1` gives it for a view equal to
  it: the listing goes through JSON as a presence_state does.
  """
  def digest_of_list(presences),
    do: presences |> Jason.encode!() |> Jason.decode!() |> digest_state()

  defp digest_state(state) do
    for {key, %{"metas" => metas}} <- state, meta <- metas, reduce: {0, 0} do
      {count, digest} -> {count + 1, digest + :erlang.phash2({key, meta})}
    end
  end
end

if Code.ensure_loaded?(Phoenix.Socket) and Code.ensure_loaded?(Phoenix.Endpoint) and
     Code.ensure_loaded?(Jason) and Code.ensure_loaded?(Bench.PhoenixPresence) do
  defmodule Bench.RoomChannel do
    @moduledoc false
    # The channel of the Phoenix guides' Presence example ("Channels" and
    # "Presence", 1.7), over a given presence module: the same code for
    # every system. A join with %{"watch" => true} lists without tracking
    # (a dashboard): it watches the storms without being part of them.
    # Joins are not logged (`log_join: false`), so that 5k log lines are
    # not timed with them. A channel hibernates as soon as it is idle
    # (`hibernate_after: 0`; Phoenix's default is 15 s): the heap that
    # encoding its presence_state took is then freed at once, where 5k
    # channels would otherwise hold ~30 GB for 15 s in a 5k storm.
    defmacro __using__(presence: presence) do
      quote do
        use Phoenix.Channel, log_join: false, log_handle_in: false, hibernate_after: 0
        alias unquote(presence), as: Presence

        @impl true
        def join(_topic, params, socket) do
          send(self(), :after_join)
          {:ok, assign(socket, :watch?, params["watch"] == true)}
        end

        @impl true
        def handle_info(:after_join, socket) do
          unless socket.assigns.watch? do
            {:ok, _} =
              Presence.track(socket, socket.assigns.user_id, %{
                online_at: inspect(System.system_time(:second))
              })
          end

          push(socket, "presence_state", Presence.list(socket))
          {:noreply, socket}
        end
      end
    end
  end

  defmodule Bench.RoomChannel.Drab do
    @moduledoc false
    use Bench.RoomChannel, presence: Bench.DrabPresence
  end

  defmodule Bench.RoomChannel.Unwindowed do
    @moduledoc false
    use Bench.RoomChannel, presence: Bench.UnwindowedPresence
  end

  defmodule Bench.RoomChannel.Sidecar do
    @moduledoc false
    use Bench.RoomChannel, presence: Bench.SidecarPresence
  end

  defmodule Bench.RoomChannel.Phoenix do
    @moduledoc false
    use Bench.RoomChannel, presence: Bench.PhoenixPresence
  end

  defmodule Bench.ChannelSocket do
    @moduledoc false
    # The app's socket: a topic prefix per presence system.
    use Phoenix.Socket, log: false

    channel("drab:*", Bench.RoomChannel.Drab)
    channel("unwindowed:*", Bench.RoomChannel.Unwindowed)
    channel("sidecar:*", Bench.RoomChannel.Sidecar)
    channel("phoenix:*", Bench.RoomChannel.Phoenix)

    @impl true
    def connect(%{"user_id" => user_id}, socket, _connect_info),
      do: {:ok, assign(socket, :user_id, user_id)}

    @impl true
    def id(_socket), do: nil
  end

  # No HTTP server: the endpoint gives the socket its channel supervisors
  # and its pubsub server, as in an app; the transport is
  # Bench.ChannelClient.
  Application.put_env(:drab_presence, Bench.Endpoint,
    pubsub_server: Bench.PubSub,
    server: false,
    secret_key_base: String.duplicate("drab_presence bench ", 4)
  )

  defmodule Bench.Endpoint do
    @moduledoc false
    use Phoenix.Endpoint, otp_app: :drab_presence
    socket("/socket", Bench.ChannelSocket, websocket: true, longpoll: false)
  end

  defmodule Bench.ChannelClient do
    @moduledoc false
    # A browser's websocket connection as the server sees it: this process
    # is the transport process (what cowboy and WebSockAdapter run for a
    # websocket), calling the socket's Phoenix.Socket.Transport callbacks
    # as they do, with the V2 JSON serializer phoenix.js speaks. Every
    # frame the socket pushes is written as a transport writes it
    # (flattened to one binary; no frame header, no TCP send) into a
    # Bench.FrameStore, and logged with its arrival time. The browser's
    # part, decoding the frames and building a phoenix.js view from them,
    # is replayed after the clock has stopped (`verify`): on one VM, it
    # would otherwise be timed as the server's.
    alias Bench.{ChannelSocket, ClientView, FrameStore}

    @transport_options Phoenix.Transports.WebSocket.default_config()

    def run(topic, key, join_payload, store, coordinator) do
      Process.put(:bench_role, "channel client")

      {:ok, state} =
        ChannelSocket.connect(%{
          endpoint: Bench.Endpoint,
          transport: :websocket,
          options: @transport_options,
          params: %{"vsn" => "2.0.0", "user_id" => key},
          connect_info: %{}
        })

      {:ok, state} = ChannelSocket.init(state)
      send(coordinator, {:connected, self()})

      receive do
        {__MODULE__, :close} ->
          exit(:normal)

        {__MODULE__, :join} ->
          # What phoenix.js sends: [join_ref, ref, topic, event, payload].
          join = Jason.encode!(["1", "1", topic, "phx_join", join_payload])
          {:reply, :ok, frame, state} = ChannelSocket.handle_in({join, opcode: :text}, state)
          client = %{log: <<>>, states: [], store: store, coordinator: coordinator}
          loop(state, write(frame, client))
      end
    end

    defp loop(state, client) do
      receive do
        {__MODULE__, :verify, from, expected, since} ->
          send(from, {__MODULE__, :verified, self(), verify(client, expected, since)})
          :erlang.garbage_collect()
          loop(state, client)

        {__MODULE__, :close} ->
          # The browser went away: the transport process ends, and with it
          # (through its monitor) the channel.
          exit(:normal)

        message ->
          case ChannelSocket.handle_info(message, state) do
            {:push, frame, state} -> loop(state, write(frame, client))
            {:ok, state} -> loop(state, client)
            {:stop, reason, _state} -> exit(reason)
          end
      end
    end

    defp write({:text, data}, client) do
      frame = IO.iodata_to_binary(data)
      at = System.monotonic_time()

      # The client's own presence_state (a prefix of the frame:
      # ["1",null,"topic","presence_state",...) tells the coordinator that
      # its join is through. It is no other client's, so it is kept here
      # (id 0 in the log), not looked up in the store.
      # A phx_error is the socket's word that the channel crashed: that
      # join will never be through.
      if event?(frame, "phx_error"), do: send(client.coordinator, {:channel_crashed, self()})

      client =
        if event?(frame, "presence_state") do
          send(client.coordinator, {:presence_state, self()})

          %{
            client
            | log: <<client.log::binary, at::64-signed, 0::32>>,
              states: [frame | client.states]
          }
        else
          id = FrameStore.put(client.store, frame)
          %{client | log: <<client.log::binary, at::64-signed, id::32>>}
        end

      # What an app does after large pushes (Phoenix.Socket's
      # `:garbage_collect` message, or `fullsweep_after`): 5k transports
      # would otherwise each keep a heap sized for the largest frame.
      if byte_size(frame) >= 16_384, do: :erlang.garbage_collect()
      client
    end

    # The event of a frame, from its prefix: [join_ref,ref,"topic","event",...
    defp event?(frame, event),
      do: :binary.match(frame, ~s(,"#{event}",), scope: {0, min(byte_size(frame), 256)}) != :nomatch

    # Replays the frames as phoenix.js would receive them. Returns the view's
    # digest, the arrival of the last frame that changed the view (once the
    # view is `expected`, that is when it became so), and the frames and
    # bytes written since `since`.
    defp verify(client, expected, since) do
      acc = %{
        view: ClientView.new(),
        own_states: Enum.reverse(client.states),
        changed_at: nil,
        states: 0,
        frames: 0,
        bytes: 0,
        errors: []
      }

      acc = replay(client.log, client.store, since, acc)
      digest = ClientView.digest(acc.view)

      %{
        same?: acc.view.synced? and digest == expected,
        digest: digest,
        changed_at: acc.changed_at,
        states: acc.states,
        frames: acc.frames,
        bytes: acc.bytes,
        errors: acc.errors
      }
    end

    defp replay(<<>>, _store, _since, acc), do: acc

    defp replay(<<at::64-signed, 0::32, log::binary>>, store, since, acc) do
      [frame | own_states] = acc.own_states
      acc = %{acc | own_states: own_states}
      replay_frame(at, byte_size(frame), Jason.decode!(frame), log, store, since, acc)
    end

    defp replay(<<at::64-signed, id::32, log::binary>>, store, since, acc) do
      {size, message} = FrameStore.decoded(store, id)
      replay_frame(at, size, message, log, store, since, acc)
    end

    defp replay_frame(at, size, message, log, store, since, acc) do
      acc =
        if at >= since,
          do: %{acc | frames: acc.frames + 1, bytes: acc.bytes + size},
          else: acc

      acc =
        case message do
          [_join_ref, _ref, _topic, "presence_state", state] ->
            view = ClientView.receive_state(acc.view, state)
            %{acc | view: view, changed_at: at, states: acc.states + 1}

          [_join_ref, _ref, _topic, "presence_diff", diff] ->
            view = ClientView.receive_diff(acc.view, diff)
            changed? = view.synced? and view.count != acc.view.count
            %{acc | view: view, changed_at: if(changed?, do: at, else: acc.changed_at)}

          [_join_ref, _ref, _topic, "phx_reply", %{"status" => "ok"}] ->
            acc

          other ->
            %{acc | errors: [Bench.Harness.short(other) | acc.errors]}
        end

      replay(log, store, since, acc)
    end
  end
end

defmodule Bench.FrameStore do
  @moduledoc false
  # The frames written to many clients of a storm (presence_diff, join
  # replies), each kept once, under an id (from 1). The clients of a topic
  # are written the same presence_diff frames (a broadcast is encoded once
  # for all fastlane subscribers), so a client logs ids: a 5k storm writes
  # 25M frames (Phoenix), and keeping each would take ~5 GB. A frame is
  # found by its bytes (exact, not a hash). Decoded diffs are kept too, so
  # that a replay decodes each once.
  @compile {:no_warn_undefined, Jason}

  def new do
    %{
      by_frame: :ets.new(:frames, [:public, read_concurrency: true, write_concurrency: true]),
      by_id: :ets.new(:frame_ids, [:public, read_concurrency: true, write_concurrency: true]),
      ids: :atomics.new(1, [])
    }
  end

  def delete(store) do
    :ets.delete(store.by_frame)
    :ets.delete(store.by_id)
  end

  @doc "The id of `frame`, which is stored if it is new."
  def put(store, frame) do
    case :ets.lookup(store.by_frame, frame) do
      [{_, id}] ->
        id

      [] ->
        id = :atomics.add_get(store.ids, 1, 1)

        if :ets.insert_new(store.by_frame, {frame, id}) do
          :ets.insert(store.by_id, {id, frame, nil})
          id
        else
          :ets.lookup_element(store.by_frame, frame, 2)
        end
    end
  end

  @doc "{bytes, decoded JSON} of a frame; a presence_diff is decoded once for all."
  def decoded(store, id) do
    case :ets.lookup(store.by_id, id) do
      [{^id, frame, nil}] ->
        message = Jason.decode!(frame)

        if match?([_, _, _, "presence_diff", _], message),
          do: :ets.update_element(store.by_id, id, {3, message})

        {byte_size(frame), message}

      [{^id, frame, message}] ->
        {byte_size(frame), message}
    end
  end
end

defmodule Bench.Channels do
  @moduledoc false
  # The channel storms: Phoenix channels with the guides' Presence code,
  # joined by N clients at once on one topic, then all closed.
  import Bench.Harness
  alias Bench.{ClientView, Harness}

  @compile {:no_warn_undefined,
            [
              Bench.ChannelClient,
              Bench.Endpoint,
              Bench.Report,
              Phoenix.Socket.Message,
              Phoenix.Socket.V2.JSONSerializer
            ]}

  @watchers 10
  # Each of the timed storms (join, leave) fails past this; a client's
  # replay of its frames (untimed) past the other.
  @timeout 600_000
  @replay_timeout 120_000
  @prefixes %{
    Bench.DrabPresence => "drab",
    Bench.UnwindowedPresence => "unwindowed",
    Bench.SidecarPresence => "sidecar",
    Bench.PhoenixPresence => "phoenix"
  }

  @doc "True when Phoenix (channels, sockets, an endpoint) and Jason are loadable."
  def available?, do: Code.ensure_loaded?(Bench.ChannelClient)

  @doc "Starts the endpoint (no HTTP server: its socket's channel supervisors)."
  def start do
    {:ok, _} = Application.ensure_all_started(:phoenix)
    {:ok, _} = Supervisor.start_link([Bench.Endpoint], strategy: :one_for_one)
    :ok
  end

  def watchers, do: @watchers

  @doc """
  9. Channel storms. #{@watchers} watchers (channels that list but do not
  track) join a fresh topic first. Then `n` clients, connected beforehand,
  join it at once: each channel tracks itself and pushes presence_state
  from list/1, and every client hears the others' joins as presence_diff
  through its channel's fastlane. Timed until every client's and watcher's
  view, built from its frames as phoenix.js builds it, equals list/1.
  Then every client closes (its transport process ends, and its channel
  with it), timed until every watcher's view is empty. Each of the two
  storms fails past `timeout_ms`.
  """
  def storm(adapter, n, timeout_ms \\ @timeout) do
    prefix = Map.fetch!(@prefixes, adapter.presence())
    topic = "#{prefix}:storm:#{System.unique_integer([:positive])}"
    store = Bench.FrameStore.new()
    watchers = connect(@watchers, topic, "watcher", %{"watch" => true}, store)

    try do
      join(watchers, deadline(timeout_ms))
      clients = connect(n, topic, "user", %{}, store)

      try do
        {_, client_pids} = clients
        {_, watcher_pids} = watchers
        settle()

        t0 = now()
        deadline = deadline(timeout_ms)
        join(clients, deadline)
        quiesce!(adapter, deadline, "the join storm")
        expected = isolated("checker", fn -> ClientView.digest_of_list(adapter.list(topic)) end)
        check!(elem(expected, 0) == n, "list/1 holds #{elem(expected, 0)} metas, expected #{n}")
        joined = verify(client_pids ++ watcher_pids, expected, t0)
        join_us = since_t0(joined, t0)
        encode_us = isolated("encoder", fn -> encode_us(adapter.list(topic), topic) end)

        # Monitored beforehand, so that the clock times the leaves alone.
        monitors = Enum.map(client_pids, &Process.monitor/1)
        t1 = now()
        deadline = deadline(timeout_ms)
        Enum.each(client_pids, &send(&1, {Bench.ChannelClient, :close}))
        await_down(monitors, deadline)

        # The channels end a moment after their transports; polled slowly, so
        # that Phoenix's list/1 (what count_connections/1 is there) does not
        # compete with the leaves it waits for.
        wait_until(
          fn -> adapter.count_connections(topic) == 0 end,
          "list/1 of the topic to be empty",
          remaining(deadline),
          20
        )

        quiesce!(adapter, deadline, "the leave storm")
        left = verify(watcher_pids, ClientView.digest_of_list(%{}), t1)
        leave_us = since_t0(left, t1)
        progress("  #{n} channels joined in #{fmt_ms(join_us)}, left in #{fmt_ms(leave_us)}")

        %{
          channels_join_ms: join_us / 1_000,
          channels_join_us: join_us / n,
          channels_leave_ms: leave_us / 1_000,
          channels_leave_us: leave_us / n,
          channels_encode_ms: encode_us * (n + 1) / 2 / 1_000,
          channels_join_frames: Enum.sum(Enum.map(joined, & &1.frames)),
          channels_join_kb: Enum.sum(Enum.map(joined, & &1.bytes)) / 1_024 / (n + @watchers),
          channels_leave_frames: Enum.sum(Enum.map(left, & &1.frames))
        }
      after
        close(clients)
      end
    after
      close(watchers)
      adapter.quiesce()
      wait_until(fn -> adapter.presences() == 0 end, "presences to be gone", 120_000, 5)
      adapter.quiesce()
      Bench.FrameStore.delete(store)
    end
  end

  # What a channel's push of one presence_state of the whole topic costs
  # the channel (Phoenix.Channel.Server.push/6 encodes it with the socket's
  # serializer) and its transport (which writes the iodata). The storm's N
  # pushes encode listings of 1 to N presences: about (N + 1) / 2 times this.
  # Any presence system's channel pays it, a floor under the join storm.
  defp encode_us(presences, topic) do
    # struct!/2: this module compiles without Phoenix too.
    message =
      struct!(Phoenix.Socket.Message,
        join_ref: "1",
        topic: topic,
        event: "presence_state",
        payload: presences
      )

    sample(
      fn ->
        {:socket_push, :text, data} = Phoenix.Socket.V2.JSONSerializer.encode!(message)
        IO.iodata_to_binary(data)
      end,
      what: "presence_state encoding"
    )
  end

  # Closed, not killed (unless a client is stuck): a channel whose transport
  # was killed logs its exit, 5k error reports after a failed storm.
  defp close({_, pids} = herd) do
    Enum.each(pids, &send(&1, {Bench.ChannelClient, :close}))

    try do
      wait_until(fn -> not Enum.any?(pids, &Process.alive?/1) end, "clients to close", 60_000, 10)
    after
      Harness.kill_herd(herd)
    end
  end

  defp fmt_ms(us), do: "#{Bench.Report.fmt(us / 1_000)} ms"

  defp deadline(timeout_ms), do: {System.monotonic_time(:millisecond) + timeout_ms, timeout_ms}

  defp remaining({at, _timeout_ms}), do: max(at - System.monotonic_time(:millisecond), 0)

  defp quiesce!(adapter, {_, timeout_ms} = deadline, what) do
    adapter.quiesce(remaining(deadline))
  rescue
    Bench.Failed -> fail!("#{what} took over #{timeout_ms} ms: diffs were still going out")
  end

  # Spawns `n` connected clients (a herd), not joined yet.
  defp connect(n, topic, role, payload, store) do
    me = self()

    herd =
      spawn_herd(n, fn i ->
        Bench.ChannelClient.run(topic, "#{role}:#{i}", payload, store, me)
      end)

    await_each(herd, :connected, "clients to connect", deadline(120_000))
    herd
  end

  # Joins every client of a herd at once; returns when every channel has
  # pushed its presence_state.
  defp join({_, pids} = herd, deadline) do
    Enum.each(pids, &send(&1, {Bench.ChannelClient, :join}))
    await_each(herd, :presence_state, "every channel's presence_state", deadline)
  end

  # A client that crashes takes its herd down: that fails the wait at once.
  # A channel that crashes fails it too, once every other has answered.
  defp await_each({herd, pids}, tag, what, {_, timeout_ms} = deadline) do
    monitor = Process.monitor(herd)

    crashed =
      Enum.count(pids, fn _ ->
        receive do
          {^tag, _pid} ->
            false

          {:channel_crashed, _pid} ->
            true

          {:DOWN, ^monitor, :process, _, reason} ->
            fail!("a client crashed while waiting for #{what}: #{short(reason)}")
        after
          remaining(deadline) -> fail!("timed out after #{timeout_ms} ms waiting for #{what}")
        end
      end)

    Process.demonitor(monitor, [:flush])

    check!(
      crashed == 0,
      "#{crashed} of #{length(pids)} channels crashed (phx_error) instead of pushing " <>
        "presence_state; their exits are logged above"
    )

    :ok
  end

  defp await_down(monitors, {_, timeout_ms} = deadline) do
    for ref <- monitors do
      receive do
        {:DOWN, ^ref, :process, _, _} -> :ok
      after
        remaining(deadline) -> fail!("clients did not close within #{timeout_ms} ms")
      end
    end

    :ok
  end

  # Every client replays its frames (a few at a time, to bound the memory
  # of their decoded views) and must hold `expected`. Views that differ are
  # replayed again 2 s later, so that the failure tells diffs that came
  # late (after the system said none was on its way) from diffs lost.
  defp verify(pids, expected, since) do
    results = replay_all(pids, expected, since)

    for {_pid, result} <- results do
      check!(result.errors == [], "a client received #{Enum.join(result.errors, ", ")}")
      check!(result.states == 1, "a client received #{result.states} presence_state pushes")
    end

    case for({pid, %{same?: false} = result} <- results, do: {pid, result}) do
      [] ->
        Enum.map(results, &elem(&1, 1))

      differing ->
        Process.sleep(2_000)
        later = replay_all(Enum.map(differing, &elem(&1, 0)), expected, since)

        fail!(
          "#{length(differing)} of #{length(pids)} clients' views are not list/1's " <>
            "(#{elem(expected, 0)} metas): they hold #{metas_range(differing)} metas; " <>
            "2 s later, #{Enum.count(later, fn {_, r} -> r.same? end)} of them equal it " <>
            "and the others hold #{metas_range(Enum.reject(later, fn {_, r} -> r.same? end))}"
        )
    end
  end

  defp metas_range([]), do: "none"

  defp metas_range(results) do
    {low, high} = results |> Enum.map(fn {_, r} -> elem(r.digest, 0) end) |> Enum.min_max()
    if low == high, do: "#{low}", else: "#{low} to #{high}"
  end

  defp replay_all(pids, expected, since),
    do: pipeline(pids, 2 * System.schedulers_online(), expected, since, %{}, [])

  defp pipeline([], _width, _expected, _since, running, done) when running == %{},
    do: done

  defp pipeline([pid | rest], width, expected, since, running, done)
       when map_size(running) < width do
    send(pid, {Bench.ChannelClient, :verify, self(), expected, since})
    pipeline(rest, width, expected, since, Map.put(running, pid, true), done)
  end

  defp pipeline(pids, width, expected, since, running, done) do
    receive do
      {Bench.ChannelClient, :verified, pid, result} ->
        pipeline(pids, width, expected, since, Map.delete(running, pid), [{pid, result} | done])
    after
      @replay_timeout ->
        fail!("a client did not replay its frames within #{@replay_timeout} ms")
    end
  end

  # µs from `t0` until the last view became what it is.
  defp since_t0(results, t0) do
    last = results |> Enum.map(& &1.changed_at) |> Enum.max()
    System.convert_time_unit(last - t0, :native, :microsecond)
  end
end
