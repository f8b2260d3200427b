defmodule Drab.Presence.ClusterCaseTest do
  # The multi-node helper itself: a distributed test VM under plain
  # `mix test`, peers with this suite's code, a netsplit and its heal, a
  # halted node, a name reused. No Phoenix needed.
  use Drab.Presence.ClusterCase

  @moduletag timeout: 120_000
  # The helper does not depend on the backend: it runs on the NIF pass only.
  @moduletag :nif_only

  test "this VM is a named node on 127.0.0.1" do
    assert Node.alive?()
    assert node() |> Atom.to_string() |> String.ends_with?("@127.0.0.1")
  end

  test "peers run this suite's code, and are stopped by name" do
    [b, c] = start_peers(2)
    assert b in Node.list() and c in Node.list()
    # The project's ebin (and so the NIF) is on the peers' code path.
    assert call(b, Drab.Presence.ClusterCase, :peer_available?, [])
    assert call(c, Code, :ensure_loaded?, [Drab.Presence.Native])
    # Code of this test file travels quoted (its funs do not exist there).
    assert eval(c, quote(do: node() == c), c: c)
    assert {:ok, _} = eval(c, quote(do: Application.ensure_all_started(:drab_presence)))

    :ok = stop_peer(c)
    wait_until(fn -> c not in Node.list() end)
    # A second stop, and a stop of a node never started, are harmless.
    :ok = stop_peer(c)
    :ok = stop_peer(:"nobody@127.0.0.1")
  end

  test "a netsplit between isolated peers lasts until healed" do
    [b, c] = start_peers(2, isolated: true)
    :ok = mesh([b, c])
    assert c in call(b, Node, :list, [])

    :ok = netsplit([b], [c])
    # A message across the split does not reconnect (dist_auto_connect once).
    send({:no_such_process, c}, :hello)
    call(b, :erlang, :send, [{:no_such_process, c}, :hello])
    Process.sleep(100)
    refute c in call(b, Node, :list, [])
    # This node still sees both sides.
    assert b in Node.list() and c in Node.list()

    :ok = heal([b], [c])
    assert c in call(b, Node, :list, [])
  end

  test "a halted peer goes down, and its name can be used again" do
    [b] = start_peers(1)
    name = b |> Atom.to_string() |> String.split("@") |> hd() |> String.to_atom()

    :ok = kill_peer(b)
    refute b in Node.list()

    [b2] = start_peers(1, names: [name])
    assert b2 == b
    assert call(b2, Node, :self, []) == b
  end
end
