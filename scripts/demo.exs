# A Drab app in miniature, on the embedded defaults: thousands of browsers
# connect to Drab topics, some subscribe to a shared topic, then leave by
# closing the tab (untrack), crashing, or just going away. A dashboard per
# topic keeps its own view from presence_diff broadcasts, as phoenix.js does.
# At the end, counts, lists and every dashboard's view must agree.
#
#   scripts/demo [browsers]     (default 5000)

browsers = String.to_integer(List.first(System.argv()) || "5000")

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

{:ok, _} = Drab.Presence.start_link(diff_window: 50)

defmodule Demo.Dashboard do
  # Keeps a topic's presences from presence_state + presence_diff, the way
  # the phoenix.js Presence client does, and counts the diffs it received.
  def start(topic) do
    parent = self()

    spawn_link(fn ->
      :ok = Drab.Presence.subscribe(topic)
      send(parent, {:subscribed, topic})
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

dashboards =
  for topic <- all_topics, into: %{} do
    pid = Demo.Dashboard.start(topic)
    receive do: ({:subscribed, ^topic} -> :ok)
    {topic, pid}
  end

print_status = fn phase ->
  rows =
    for topic <- all_topics do
      :io_lib.format("  ~-52s ~8B users ~8B connections~n", [
        topic,
        Drab.Presence.count_users(topic),
        Drab.Presence.count_connections(topic)
      ])
    end

  IO.puts(["#{phase}\n" | rows])
end

IO.puts("drab_presence demo: #{browsers} browsers on #{length(topics)} Drab topics + #{shared}\n")
started = System.monotonic_time(:millisecond)

pids =
  for chunk <- Enum.chunk_every(1..browsers, div(browsers, 5) |> max(1)) do
    pids =
      for i <- chunk,
          do: {i, Demo.Browser.start(i, Enum.at(topics, rem(i, length(topics))), shared)}

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

# Let the last diffs out before comparing the dashboards' views.
Process.sleep(200)

failures =
  for topic <- all_topics, reduce: [] do
    failures ->
      {users, connections} = expected[topic]
      listed = Drab.Presence.list(topic)
      listed_refs = for {key, %{metas: m}} <- listed, meta <- m, into: %{}, do: {meta.phx_ref, key}
      send(dashboards[topic], {:report, self()})
      {view, diffs} = receive do: ({:dashboard, ^topic, view, diffs} -> {view, diffs})
      IO.puts("  #{topic}: dashboard applied #{diffs} presence_diffs")

      checks = [
        {Drab.Presence.count_users(topic) == users,
         "count_users is #{Drab.Presence.count_users(topic)}, expected #{users}"},
        {Drab.Presence.count_connections(topic) == connections,
         "count_connections is #{Drab.Presence.count_connections(topic)}, expected #{connections}"},
        {map_size(listed) == users, "list/1 has #{map_size(listed)} keys, expected #{users}"},
        {map_size(listed_refs) == connections,
         "list/1 has #{map_size(listed_refs)} metas, expected #{connections}"},
        {view == listed_refs, "the dashboard's view differs from list/1"}
      ]

      failures ++ for {false, message} <- checks, do: "#{topic}: #{message}"
  end

elapsed = System.monotonic_time(:millisecond) - started
IO.puts("\nelapsed: #{elapsed} ms, table: #{inspect(Drab.Presence.stats())}")

case failures do
  [] ->
    IO.puts("OK: counts, lists and dashboards match the #{length(alive)} browsers still online")

  _ ->
    Enum.each(failures, &IO.puts("MISMATCH #{&1}"))
    System.halt(1)
end
