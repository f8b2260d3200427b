defmodule Drab.Presence.SoakTest do
  # Churn against an exact model while the presence processes are killed and
  # restarted (see test/support/soak.ex; scripts/soak runs it for longer).
  # Not async: it measures the NIF heap, shared by every table. The
  # dispatcher's error logs about a dead registry are expected: captured.
  use Drab.PresenceCase, async: false

  alias Drab.Presence.Soak

  @moduletag :soak
  @moduletag :capture_log
  @moduletag timeout: 120_000

  test "churn without chaos: views, list/1 and counts equal the model" do
    result = Soak.run(seconds: 1.5, chaos: [])
    IO.puts("\n" <> Soak.summary(result))
  end

  test "listing while others churn: a subscriber that never lists hears each join before its leave" do
    # With no redelivery (no dispatcher killed) and no resync, every
    # subscriber is pure: whatever the listers saw, it must never hear a
    # ref leave that it did not hear join, nor a ref join twice.
    result = Soak.run(seconds: 3, chaos: [], listers: 2, diff_window: 50)
    IO.puts("\n" <> Soak.summary(result))
    assert result.lists > 100
    assert result.resyncs == 0
    assert {result.unknown_leaves, result.duplicate_joins} == {0, 0}
  end

  test "killing the dispatcher as it delivers loses no diff" do
    # Two kills, each right as a diff arrives: under the supervisor's
    # default restart intensity, so no subscriber has to resync.
    result =
      Soak.run(
        seconds: 4,
        chaos: [:kill_dispatcher],
        chaos_every_ms: 1_500..1_800,
        mid_delivery: 1.0
      )

    IO.puts("\n" <> Soak.summary(result))
    assert result.chaos.dispatcher_kills >= 2
    assert result.resyncs == 0
  end

  test "every kind of chaos: subscribers resync and stay exact" do
    result = Soak.run(seconds: 5)
    IO.puts("\n" <> Soak.summary(result))
    assert result.chaos.dispatcher_kills > 0 and result.chaos.registry_kills > 0
    assert result.chaos.restarts > 0 and result.resyncs > 0
    # Calls made while a restart had the module stopped raised, took
    # nothing, and the model still matches.
    assert result.stopped_calls > 0
  end
end
