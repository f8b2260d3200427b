defmodule Drab.Presence.ReloadTest do
  # Reloading the NIF module can break, or crash, the VM that does it: each
  # case runs test/fresh_vm/reload.exs in an `elixir` OS process of its own,
  # so the suite's VM is never touched.
  use Drab.PresenceCase, async: false

  @moduletag timeout: 120_000
  @script Path.expand("../../fresh_vm/reload.exs", __DIR__)

  for way <- ["purge_load", "delete_purge_load"] do
    test "after #{way} of Drab.Presence.Native, a running table still works" do
      {output, status} = run_clean_vm(@script, [unquote(way)])
      assert status == 0, "reload.exs #{unquote(way)} exited with #{status}:\n#{output}"
      assert output =~ "reload: ok"
    end
  end
end
