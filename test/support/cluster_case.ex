defmodule Drab.Presence.ClusterCase do
  @moduledoc """
  Multi-node ExUnit tests on this machine: makes the test VM a distributed
  node on 127.0.0.1 (even under a plain `mix test`), starts `:peer` nodes
  with the same code path, runs code on them, cuts and heals connections
  between them (netsplits), and stops them.

      use Drab.Presence.ClusterCase

      test "two nodes" do
        [b, c] = start_peers(2)
        assert call(b, Node, :self, []) == b
        netsplit([b], [c])
        heal([b], [c])
      end

  `use` makes the module `async: false`, tags it `:cluster`, makes the VM
  distributed in `setup_all`, and imports these functions. Peers started from
  a test are stopped when it ends. Needs OTP 25+ (`:peer`): without it the
  module's tests are skipped, with a message.

  Peers on 127.0.0.1 only: the node and its peers listen on loopback
  (`-kernel inet_dist_use_interface {127,0,0,1}`), and names are unique per
  OS process, so concurrent test runs on one machine do not clash.
  """
  use ExUnit.CaseTemplate

  # :peer is OTP 25+; the suite still compiles on older OTPs, where these
  # tests are skipped.
  @compile {:no_warn_undefined, [:peer, :erpc]}

  using opts do
    # Nodes, names and epmd are shared by the whole VM.
    if opts[:async], do: raise(ArgumentError, "#{inspect(__MODULE__)} cannot be async")

    quote do
      import Drab.Presence.ClusterCase

      @moduletag :cluster

      unless Drab.Presence.ClusterCase.peer_available?() do
        IO.puts("Skipping #{inspect(__MODULE__)}: it starts nodes with :peer, which needs OTP 25+")
        @moduletag skip: "needs OTP 25+ (:peer)"
      end

      setup_all do
        if Drab.Presence.ClusterCase.peer_available?(),
          do: Drab.Presence.ClusterCase.ensure_distributed!()

        :ok
      end
    end
  end

  @host ~c"127.0.0.1"

  @doc "True when this OTP has `:peer` (OTP 25+)."
  @spec peer_available?() :: boolean()
  def peer_available?, do: Code.ensure_loaded?(:peer)

  @doc """
  Makes this VM a distributed node on 127.0.0.1 unless it is one already,
  starting epmd first if needed. Returns the node name. The name is unique
  per OS process, so that two test runs at once do not collide in epmd.
  """
  @spec ensure_distributed!() :: node()
  def ensure_distributed! do
    unless Node.alive?() do
      # `epmd -daemon` returns at once, whether or not one is running. A VM
      # started without --name has none of its own.
      epmd = System.find_executable("epmd") || raise "epmd not found on the PATH"
      {_, 0} = System.cmd(epmd, ["-daemon"])
      await_epmd!(100)
      # Loopback only, for the node and for every connection it accepts.
      :ok = :application.set_env(:kernel, :inet_dist_use_interface, {127, 0, 0, 1})
      name = :"drab_test_#{System.pid()}_#{System.unique_integer([:positive])}@127.0.0.1"

      case :net_kernel.start([name, :longnames]) do
        {:ok, _} -> :ok
        {:error, {:already_started, _}} -> :ok
        {:error, reason} -> raise "could not make this VM distributed: #{inspect(reason)}"
      end
    end

    node()
  end

  # `epmd -daemon` forks and returns before the daemon listens: on a fresh
  # machine, a node started at once finds no epmd (econnrefused).
  defp await_epmd!(0), do: raise("epmd did not start listening on #{@host}")

  defp await_epmd!(tries) do
    case :erl_epmd.names(@host) do
      {:ok, _names} ->
        :ok

      {:error, _} ->
        Process.sleep(50)
        await_epmd!(tries - 1)
    end
  end

  @doc """
  Starts `count` peer nodes on 127.0.0.1 with this node's code path (which
  holds ERL_LIBS's and the project's ebins), `:elixir` and this app started,
  and logging at `:warning`. Each is stopped when the calling test ends.
  Returns their node names.

  Options:

    * `:names` - names (atoms, without host) for the first peers, e.g. to
      restart a node under the name it had.
    * `:isolated` - `true` starts them with `dist_auto_connect once` and
      `prevent_overlapping_partitions false`: a connection cut by
      `netsplit/2` stays cut until `heal/2`, and does not cut others.
    * `:connect_all` - `false` passes `-connect_all false` (no full mesh from
      `global`); peers then connect only to this node until told otherwise.
    * `:args` - more command-line arguments (strings) for the peers.
    * `:apps` - applications to start on each peer (default
      `[:drab_presence]`; `[]` for none).
  """
  @spec start_peers(pos_integer(), keyword()) :: [node()]
  def start_peers(count, opts \\ []) do
    ensure_distributed!()
    names = Keyword.get(opts, :names, [])
    names = names ++ for(_ <- 1..count, do: unique_name())

    for name <- Enum.take(names, count) do
      {peer, node} = start_peer(name, opts)
      ExUnit.Callbacks.on_exit(fn -> stop_peer(peer) end)
      node
    end
  end

  @doc """
  Starts one peer like `start_peers/2`, without stopping it at the end of a
  test (for a `setup_all`, or code outside ExUnit's callbacks): stop it with
  `stop_peer/1`. Returns `{peer_pid, node}`.
  """
  @spec start_peer(atom(), keyword()) :: {pid(), node()}
  def start_peer(name, opts \\ []) do
    ensure_distributed!()

    args =
      Enum.flat_map(:code.get_path(), &[~c"-pa", &1]) ++
        [~c"-kernel", ~c"inet_dist_use_interface", ~c"{127,0,0,1}"] ++
        if(opts[:isolated],
          do: ~w(-kernel dist_auto_connect once -kernel prevent_overlapping_partitions false)c,
          else: []
        ) ++
        if(opts[:connect_all] == false, do: [~c"-connect_all", ~c"false"], else: []) ++
        Enum.map(Keyword.get(opts, :args, []), &to_charlist/1)

    {:ok, peer, node} = :peer.start_link(%{name: name, host: @host, longnames: true, args: args})

    # The peer's controller must not take the test process down with it
    # when the node is halted on purpose; it is tracked by name instead.
    Process.unlink(peer)
    :persistent_term.put({__MODULE__, node}, peer)
    {:ok, _} = :erpc.call(node, :application, :ensure_all_started, [:elixir])
    :ok = :erpc.call(node, :logger, :set_primary_config, [:level, :warning])

    for app <- Keyword.get(opts, :apps, [:drab_presence]) do
      {:ok, _} = :erpc.call(node, :application, :ensure_all_started, [app])
    end

    {peer, node}
  end

  defp unique_name, do: :"peer_#{System.pid()}_#{System.unique_integer([:positive])}"

  @doc """
  Stops a peer, by its node name or by the pid `start_peer/2` returned. A
  peer that is already gone (halted, or stopped before) is fine.
  """
  @spec stop_peer(node() | pid()) :: :ok
  def stop_peer(node) when is_atom(node) do
    case :persistent_term.get({__MODULE__, node}, nil) do
      nil ->
        :ok

      peer ->
        :persistent_term.erase({__MODULE__, node})
        stop_peer(peer)
    end
  end

  def stop_peer(peer) when is_pid(peer) do
    :peer.stop(peer)
    :ok
  catch
    :exit, _ -> :ok
  end

  @doc "Halts `node` at once, as a crash would (no clean shutdown)."
  @spec kill_peer(node()) :: :ok
  def kill_peer(node) do
    true = Node.monitor(node, true)
    :erpc.cast(node, :erlang, :halt, [137])

    receive do
      {:nodedown, ^node} -> :ok
    after
      10_000 -> raise "#{node} did not go down"
    end
  end

  @doc "`apply(module, function, args)` on `node`, with :erpc (exceptions are re-raised here)."
  @spec call(node(), module(), atom(), [term()], timeout()) :: term()
  def call(node, module, function, args, timeout \\ 30_000),
    do: :erpc.call(node, module, function, args, timeout)

  @doc """
  Evaluates quoted code on `node` with `binding`, and returns its value.

  For code written in a test file: a test module is compiled in memory, on
  this node only, so a fun of it cannot run on a peer (`:undef`), whereas
  quoted code is shipped as data. Modules of `elixir/` and `test/support/`
  are compiled to the ebin the peers load: call those with `call/5`.

      eval(node, quote(do: Drab.Presence.count_users(topic)), topic: "room")

  Variables in `quoted` are bound from `binding` by name.
  """
  @spec eval(node(), Macro.t(), keyword(), timeout()) :: term()
  def eval(node, quoted, binding \\ [], timeout \\ 30_000) do
    # Variables are bound by name: a `quote` in a test gives them the test
    # module's context, which a binding list cannot name.
    quoted =
      Macro.prewalk(quoted, fn
        {name, meta, context} when is_atom(name) and is_atom(context) -> {name, meta, nil}
        other -> other
      end)

    {value, _binding} = :erpc.call(node, Code, :eval_quoted, [quoted, binding], timeout)
    value
  end

  @doc """
  Cuts every connection between a node of `side_a` and one of `side_b`
  (`:erlang.disconnect_node/1`, run on the `side_a` node), and waits until
  neither side lists the other. Peers should be `isolated: true`, or any
  message between the sides reconnects them. This node may be on a side.
  """
  @spec netsplit([node()], [node()]) :: :ok
  def netsplit(side_a, side_b) do
    for a <- side_a, b <- side_b do
      true = call(a, :erlang, :disconnect_node, [b])
    end

    wait_until(fn ->
      Enum.all?(side_a, fn a -> Enum.all?(side_b, &(&1 not in call(a, Node, :list, []))) end) and
        Enum.all?(side_b, fn b -> Enum.all?(side_a, &(&1 not in call(b, Node, :list, []))) end)
    end)
  end

  @doc "Connects every node of `side_a` to every node of `side_b` again."
  @spec heal([node()], [node()]) :: :ok
  def heal(side_a, side_b) do
    for a <- side_a, b <- side_b do
      true = call(a, :net_kernel, :connect_node, [b])
    end

    :ok
  end

  @doc "Connects every node of `nodes` to every other."
  @spec mesh([node()]) :: :ok
  def mesh(nodes) do
    for a <- nodes, b <- nodes, a < b, do: true = call(a, :net_kernel, :connect_node, [b])
    :ok
  end

  @doc "Polls `fun` every 10 ms until it returns a truthy value; flunks after `timeout` ms."
  @spec wait_until((() -> as_boolean(term())), pos_integer()) :: :ok
  def wait_until(fun, timeout \\ 5_000) do
    deadline = System.monotonic_time(:millisecond) + timeout
    do_wait(fun, timeout, deadline)
  end

  defp do_wait(fun, timeout, deadline) do
    cond do
      fun.() ->
        :ok

      System.monotonic_time(:millisecond) > deadline ->
        ExUnit.Assertions.flunk("condition not met within #{timeout} ms")

      true ->
        Process.sleep(10) && do_wait(fun, timeout, deadline)
    end
  end
end
