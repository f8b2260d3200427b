defmodule Drab.Presence.FreshVMTest do
  # The suite's VM has long made every atom a listing needs, so only a new VM
  # shows whether the NIF can build a listing on its own: each test runs a
  # script of test/fresh_vm in an `elixir` OS process of its own. Neither
  # those scripts nor this file may spell out the atom that meta lists are keyed
  # by; it is built from halves.
  use Drab.PresenceCase, async: true

  # NIF internals: scheduler holds, reloads, clean VMs on the NIF.
  @moduletag :nif_only

  @moduletag timeout: 120_000
  @atom_name "me" <> "tas"

  for {script, name} <- [
        {"list.exs", "list/1, get_by_key/2 and diffs work in a VM that never made the atom"},
        {"app_tree.exs", "an app's tree with Drab.Presence survives a second of diffs there"}
      ] do
    test name do
      script = Path.expand("../../fresh_vm/#{unquote(script)}", __DIR__)
      refute File.read!(script) =~ @atom_name, "#{script} names the atom: it proves nothing"
      refute File.read!(__ENV__.file) =~ @atom_name

      {output, status} = run_clean_vm(script)
      assert status == 0, "#{Path.basename(script)} exited with #{status}:\n#{output}"
      assert output =~ "fresh VM: ok"
    end
  end
end
