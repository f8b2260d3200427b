# A Drab app in miniature, on the embedded defaults: thousands of browsers
# connect to Drab topics, some subscribe to a shared topic, then leave by
# closing the tab (untrack), crashing, or just going away. A dashboard per
# topic keeps its own view from presence_diff broadcasts, as phoenix.js does.
# At the end, counts, lists and every dashboard's view must agree.
#
#   scripts/demo [browsers] [--nodes N] [--backend nif|sidecar]
#                                  (default 5000 browsers, 1 node, the NIF)
#
# With --nodes N, the app runs on N nodes of a local cluster (this VM and
# N - 1 :peer nodes on 127.0.0.1, cluster mode over Erlang distribution),
# browsers are spread over them as a load balancer would, and every node
# must show every browser: counts, lists and each node's dashboards.

# The usage is this file's opening comment (scripts/demo prints it too).
usage = fn status ->
  __ENV__.file
  |> File.stream!()
  |> Enum.take_while(&String.starts_with?(&1, "#"))
  |> Enum.map_join(&String.replace_prefix(&1, "# ", ""))
  |> String.replace(~r/^#\n/m, "\n")
  |> IO.write()

  System.halt(status)
end

{switches, args, invalid} =
  OptionParser.parse(System.argv(),
    strict: [nodes: :integer, backend: :string, help: :boolean],
    aliases: [h: :help]
  )

cond do
  switches[:help] ->
    usage.(0)

  invalid != [] or length(args) > 1 or not Enum.all?(args, &(&1 =~ ~r/^[1-9][0-9]*$/)) or
      Keyword.get(switches, :backend, "nif") not in ["nif", "sidecar"] ->
    IO.puts(:stderr, "scripts/demo: bad arguments #{inspect(System.argv())}\n")
    usage.(2)

  true ->
    :ok
end

browsers = String.to_integer(List.first(args) || "5000")
node_count = Keyword.get(switches, :nodes, 1)
backend = String.to_existing_atom(Keyword.get(switches, :backend, "nif"))

topics = [
  "__drab:same_path:/",
  "__drab:same_path:/chat",
  "__drab:controller:Elixir.ShopWeb.CartController"
]

shared = "__drab:lobby"
all_topics = topics ++ [shared]
# As Drab with `config :drab, :presence, id: [session: :user_id]`: logged-in
# users are keyed by user id (one user, many tabs); guests by browser id.
Application.put_env(:drab, :presence, id: [session: :user_id])

{:module, _, node_binary, _} =
  defmodule Demo.Node do
    # What each node of the app runs: Drab's config and Drab.Presence.
    # The backend is chosen the way an app chooses it: in that same config.
    def start(backend) do
      Application.put_env(:drab, :presence, id: [session: :user_id], backend: backend)
      {:ok, pid} = Drab.Presence.start_link(diff_window: 50)
      Process.unlink(pid)
      :ok
    end

    def counts(topic),
      do: {Drab.Presence.count_users(topic), Drab.Presence.count_connections(topic)}
  end

{:module, _, dashboard_binary, _} =
  defmodule Demo.Dashboard do
    # Keeps a topic's presences from presence_state + presence_diff, the way
    # the phoenix.js Presence client does, and counts the diffs it received.
    def start(topic, parent) do
      spawn(fn ->
        :ok = Drab.Presence.subscribe(topic)
        send(parent, {:subscribed, topic, self()})
        loop(topic, index(Drab.Presence.list(topic)), 0)
      end)
    end

    defp loop(topic, view, diffs) do
      receive do
        %{event: "presence_diff", payload: %{joins: joins, leaves: leaves}} ->
          left = index(leaves)
          loop(topic, view |> Map.drop(Map.keys(left)) |> Map.merge(index(joins)), diffs + 1)

        {:report, from} ->
          send(from, {:dashboard, topic, view, diffs})
          loop(topic, view, diffs)
      end
    end

    defp index(presences) do
      for {key, %{metas: metas}} <- presences, meta <- metas, into: %{}, do: {meta.phx_ref, key}
    end
  end

{:module, _, browser_binary, _} =
  defmodule Demo.Browser do
    # A Drab channel process: Drab calls start/2 on connect and on subscribe,
    # stop/2 on unsubscribe; nothing on disconnect: the process just ends.
    def start(i, topic, shared) do
      spawn(fn ->
        assigns =
          if rem(i, 3) == 0,
            do: %{__client_id: "browser-#{i}", __session: %{user_id: rem(i, 700)}, __store: %{}},
            else: %{__client_id: "browser-#{i}", __session: %{}, __store: %{}}

        socket = %{topic: topic, channel_pid: self(), assigns: assigns}
        {:ok, _} = Drab.Presence.start(socket, topic)
        if rem(i, 4) == 0, do: {:ok, _} = Drab.Presence.start(socket, shared)

        receive do
          :unsubscribe ->
            :ok = Drab.Presence.stop(socket, shared)
            Process.sleep(:infinity)

          :close_tab ->
            exit(:normal)

          :crash ->
            exit(:connection_lost)
        end
      end)
    end
  end

nodes =
  if node_count > 1 do
    unless Code.ensure_loaded?(:peer) do
      IO.puts("--nodes needs OTP 25 or later (:peer), this is OTP #{System.otp_release()}")
      System.halt(2)
    end

    unless Node.alive?() do
      {_, 0} = System.cmd("epmd", ["-daemon"])

      # epmd -daemon returns before the daemon listens (a fresh machine's
      # first node would find no epmd).
      epmd_up? = fn ->
        match?({:ok, _}, :erl_epmd.names(~c"127.0.0.1")) or
          (Process.sleep(50) == :ok and false)
      end

      Enum.any?(1..100, fn _ -> epmd_up?.() end) ||
        raise "epmd did not start listening on 127.0.0.1"

      # Loopback only, for the node and every connection it accepts.
      :ok = :application.set_env(:kernel, :inet_dist_use_interface, {127, 0, 0, 1})
      {:ok, _} = :net_kernel.start([:"demo#{System.pid()}@127.0.0.1", :longnames])
    end

    code_path = Enum.flat_map(:code.get_path(), &[~c"-pa", &1])

    peers =
      for n <- 2..node_count do
        name = :"demo#{System.pid()}_#{n}"

        {:ok, _peer, peer} =
          :peer.start_link(%{name: name, host: ~c"127.0.0.1", longnames: true, args: code_path})

        {:ok, _} = :erpc.call(peer, :application, :ensure_all_started, [:drab_presence])
        :ok = :erpc.call(peer, :logger, :set_primary_config, [:level, :warning])

        # The demo's modules live only in this VM: load them there too.
        for {module, binary} <- [
              {Demo.Node, node_binary},
              {Demo.Dashboard, dashboard_binary},
              {Demo.Browser, browser_binary}
            ] do
          {:module, ^module} = :erpc.call(peer, :code, :load_binary, [module, ~c"demo", binary])
        end

        peer
      end

    [node() | peers]
  else
    [node()]
  end

# On this node by a plain call: :erpc is OTP 23+, and the one-node demo runs
# on OTP 22 too (scripts/test-with).
on_node = fn
  node, module, function, args when node == node() -> apply(module, function, args)
  node, module, function, args -> :erpc.call(node, module, function, args)
end

for node <- nodes, do: :ok = on_node.(node, Demo.Node, :start, [backend])

dashboards =
  for node <- nodes, topic <- all_topics, into: %{} do
    pid = on_node.(node, Demo.Dashboard, :start, [topic, self()])
    receive do: ({:subscribed, ^topic, ^pid} -> :ok)
    {{node, topic}, pid}
  end

print_status = fn phase ->
  rows =
    for topic <- all_topics, node <- nodes do
      {users, connections} = on_node.(node, Demo.Node, :counts, [topic])
      name = if node_count > 1, do: "  #{node}", else: ""
      :io_lib.format("  ~-52s ~8B users ~8B connections~s~n", [topic, users, connections, name])
    end

  IO.puts(["#{phase}\n" | rows])
end

IO.puts(
  "drab_presence demo: #{browsers} browsers on #{length(topics)} Drab topics + #{shared}" <>
    if(node_count > 1, do: ", spread over #{node_count} nodes\n", else: "\n")
)

started = System.monotonic_time(:millisecond)

pids =
  for chunk <- Enum.chunk_every(1..browsers, div(browsers, 5) |> max(1)) do
    pids =
      for i <- chunk do
        node = Enum.at(nodes, rem(i, node_count))
        topic = Enum.at(topics, rem(i, length(topics)))
        {i, on_node.(node, Demo.Browser, :start, [i, topic, shared])}
      end

    Process.sleep(100)
    print_status.("connected #{List.last(Enum.to_list(chunk))} of #{browsers}")
    pids
  end
  |> List.flatten()

# Two in seven browsers leave: some close the tab, some crash, some only
# unsubscribe from the shared topic.
leave_how = fn i -> Enum.at([:close_tab, :crash, :unsubscribe], rem(div(i, 7), 3)) end
{leaving, _staying} = Enum.split_with(pids, fn {i, _} -> rem(i, 7) in [1, 2] end)
for {i, pid} <- leaving, do: send(pid, leave_how.(i))

gone = for {i, pid} <- leaving, leave_how.(i) != :unsubscribe, into: MapSet.new(), do: pid
unsubscribed = for {i, pid} <- leaving, leave_how.(i) == :unsubscribe, into: MapSet.new(), do: pid

Process.sleep(300)
print_status.("after #{length(leaving)} browsers closed, crashed or unsubscribed")

# What should be online, from what we know of each browser.
alive = for {i, pid} <- pids, not MapSet.member?(gone, pid), do: {i, pid}

expected =
  for topic <- all_topics, into: %{} do
    members =
      for {i, pid} <- alive,
          (topic == shared and rem(i, 4) == 0 and not MapSet.member?(unsubscribed, pid)) or
            Enum.at(topics, rem(i, length(topics))) == topic,
          do: if(rem(i, 3) == 0, do: to_string(rem(i, 700)), else: "browser-#{i}")

    {topic, {members |> Enum.uniq() |> length(), length(members)}}
  end

# Let the last diffs out (and, across nodes, the last deltas and the diffs
# they make there) before comparing the dashboards' views.
Process.sleep(if node_count > 1, do: 500, else: 200)

failures =
  for node <- nodes, topic <- all_topics, reduce: [] do
    failures ->
      {users, connections} = expected[topic]
      {counted_users, counted_connections} = on_node.(node, Demo.Node, :counts, [topic])
      listed = on_node.(node, Drab.Presence, :list, [topic])
      listed_refs = for {key, %{metas: m}} <- listed, meta <- m, into: %{}, do: {meta.phx_ref, key}
      dashboard = dashboards[{node, topic}]
      send(dashboard, {:report, self()})
      {view, diffs} = receive do: ({:dashboard, ^topic, view, diffs} -> {view, diffs})
      where = if node_count > 1, do: "#{node} ", else: ""
      IO.puts("  #{where}#{topic}: dashboard applied #{diffs} presence_diffs")

      checks = [
        {counted_users == users, "count_users is #{counted_users}, expected #{users}"},
        {counted_connections == connections,
         "count_connections is #{counted_connections}, expected #{connections}"},
        {map_size(listed) == users, "list/1 has #{map_size(listed)} keys, expected #{users}"},
        {map_size(listed_refs) == connections,
         "list/1 has #{map_size(listed_refs)} metas, expected #{connections}"},
        {view == listed_refs, "the dashboard's view differs from list/1"}
      ]

      failures ++ for {false, message} <- checks, do: "#{where}#{topic}: #{message}"
  end

elapsed = System.monotonic_time(:millisecond) - started
IO.puts("\nelapsed: #{elapsed} ms, table: #{inspect(Drab.Presence.stats())}")

case failures do
  [] ->
    everywhere = if node_count > 1, do: " on each of #{node_count} nodes", else: ""

    IO.puts(
      "OK: counts, lists and dashboards#{everywhere} match the #{length(alive)} browsers still online"
    )

  _ ->
    Enum.each(failures, &IO.puts("MISMATCH #{&1}"))
    System.halt(1)
end
