//! Single-file key mapping in both directions: examples from the kohya reference table, keys
//! written back and read again, and names no model has.

use super::*;

fn layout() -> LdmLayout {
    LdmLayout {
        layers_per_block: 2,
        vae_up_blocks: 4,
        text_encoder: TextEncoderLayout::OpenClip,
    }
}

fn renamed(key: &str) -> String {
    match layout().diffusers_name(key).unwrap() {
        LdmTensor::Renamed(t) => format!("{}:{}", t.part, t.name),
        other => panic!("{key}: {other:?}"),
    }
}

/// The SD1.5/SD2.x numbering (two layers per block), examples from the kohya reference table.
#[test]
fn unet_blocks_map_like_the_reference_table() {
    for (ldm, diffusers) in [
        (
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        ),
        (
            "input_blocks.5.0.in_layers.2.weight",
            "down_blocks.1.resnets.1.conv1.weight",
        ),
        (
            "input_blocks.3.0.op.weight",
            "down_blocks.0.downsamplers.0.conv.weight",
        ),
        ("input_blocks.0.0.bias", "conv_in.bias"),
        (
            "middle_block.2.emb_layers.1.weight",
            "mid_block.resnets.1.time_emb_proj.weight",
        ),
        (
            "middle_block.1.proj_in.weight",
            "mid_block.attentions.0.proj_in.weight",
        ),
        (
            "output_blocks.2.1.conv.weight",
            "up_blocks.0.upsamplers.0.conv.weight",
        ),
        (
            "output_blocks.5.2.conv.bias",
            "up_blocks.1.upsamplers.0.conv.bias",
        ),
        (
            "output_blocks.4.1.norm.weight",
            "up_blocks.1.attentions.1.norm.weight",
        ),
        (
            "output_blocks.11.0.skip_connection.weight",
            "up_blocks.3.resnets.2.conv_shortcut.weight",
        ),
        ("time_embed.2.weight", "time_embedding.linear_2.weight"),
        ("out.2.weight", "conv_out.weight"),
    ] {
        assert_eq!(
            renamed(&format!("{UNET_PREFIX}{ldm}")),
            format!("unet:{diffusers}"),
            "{ldm}"
        );
    }
}

#[test]
fn vae_and_open_clip_names() {
    for (ldm, diffusers) in [
        (
            "first_stage_model.decoder.up.3.block.0.nin_shortcut.weight",
            "vae:decoder.up_blocks.0.resnets.0.conv_shortcut.weight",
        ),
        (
            "first_stage_model.decoder.up.1.upsample.conv.weight",
            "vae:decoder.up_blocks.2.upsamplers.0.conv.weight",
        ),
        (
            "first_stage_model.encoder.down.0.downsample.conv.bias",
            "vae:encoder.down_blocks.0.downsamplers.0.conv.bias",
        ),
        (
            "first_stage_model.encoder.mid.attn_1.proj_out.weight",
            "vae:encoder.mid_block.attentions.0.to_out.0.weight",
        ),
        (
            "first_stage_model.encoder.norm_out.weight",
            "vae:encoder.conv_norm_out.weight",
        ),
        (
            "cond_stage_model.model.transformer.resblocks.3.mlp.c_proj.bias",
            "text_encoder:text_model.encoder.layers.3.mlp.fc2.bias",
        ),
        (
            "cond_stage_model.model.positional_embedding",
            "text_encoder:text_model.embeddings.position_embedding.weight",
        ),
        (
            "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight",
            "text_encoder:text_model.encoder.layers.0.mlp.fc1.weight",
        ),
    ] {
        assert_eq!(renamed(ldm), diffusers, "{ldm}");
    }
    let LdmTensor::StackedQkv(parts) = layout()
        .diffusers_name("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
        .unwrap()
    else {
        panic!("in_proj_weight is stacked")
    };
    assert_eq!(
        parts[2].name,
        "text_model.encoder.layers.0.self_attn.v_proj.weight"
    );
    for other in [
        "cond_stage_model.model.text_projection",
        "model_ema.decay",
        "alphas_cumprod",
    ] {
        assert_eq!(
            layout().diffusers_name(other).unwrap(),
            LdmTensor::Other,
            "{other}"
        );
    }
    let err = layout()
        .diffusers_name("model.diffusion_model.input_blocks.1.7.x")
        .unwrap_err();
    assert!(err.to_string().contains("input_blocks.1.7.x"), "{err}");
}

/// Writing reads the same rules, so every key comes back from the name it maps to.
#[test]
fn ldm_keys_invert_diffusers_names() {
    let up_attn = [1, 2, 3];
    for key in [
        "model.diffusion_model.input_blocks.4.1.proj_in.weight",
        "model.diffusion_model.input_blocks.6.0.op.bias",
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.8.2.conv.weight",
        "model.diffusion_model.output_blocks.9.0.skip_connection.bias",
        "model.diffusion_model.middle_block.2.out_layers.3.weight",
        "first_stage_model.decoder.up.0.block.2.nin_shortcut.bias",
        "first_stage_model.encoder.down.1.downsample.conv.weight",
        "first_stage_model.encoder.mid.attn_1.norm.weight",
        "first_stage_model.decoder.mid.attn_1.q.bias",
        "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.model.ln_final.weight",
        "cond_stage_model.model.transformer.resblocks.7.mlp.c_fc.bias",
    ] {
        let LdmTensor::Renamed(t) = layout().diffusers_name(key).unwrap() else {
            panic!("{key} is renamed")
        };
        let target = LdmTarget::Key {
            key: key.into(),
            to_conv: false,
        };
        assert_eq!(layout().ldm_key(&t, &up_attn).unwrap(), target, "{t:?}");
    }
}

#[test]
fn ldm_keys_stack_qkv_and_reshape_vae_projections() {
    let target = |part, name: &str| {
        layout()
            .ldm_key(&DiffusersTensor::new(part, name), &[])
            .map_err(|e| e.to_string())
    };
    let te = ModelPart::TextEncoder;
    for name in [
        "text_model.encoder.layers.5.self_attn.k_proj.bias",
        "encoder.layers.5.self_attn.k_proj.bias",
    ] {
        assert_eq!(
            target(te, name).unwrap(),
            LdmTarget::Stacked {
                key: "cond_stage_model.model.transformer.resblocks.5.attn.in_proj_bias".into(),
                index: 1
            }
        );
    }
    assert_eq!(
        target(
            ModelPart::Vae,
            "decoder.mid_block.attentions.0.to_out.0.weight"
        )
        .unwrap(),
        LdmTarget::Key {
            key: "first_stage_model.decoder.mid.attn_1.proj_out.weight".into(),
            to_conv: true
        }
    );
    let clip = LdmLayout {
        text_encoder: TextEncoderLayout::Clip,
        ..layout()
    };
    assert_eq!(
        clip.ldm_key(
            &DiffusersTensor::new(te, "encoder.layers.0.mlp.fc1.weight"),
            &[]
        )
        .unwrap()
        .key(),
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    );
    let err = target(ModelPart::Unet, "class_embedding.linear_1.weight").unwrap_err();
    assert!(err.contains("has no single-file"), "{err}");
    let err = target(ModelPart::TextEncoder2, "text_projection.weight").unwrap_err();
    assert!(err.contains("only SDXL single files"), "{err}");
    // `block.0.nin_shortcut.` reads back as `conv_shortcut`, not as this name.
    let err = target(
        ModelPart::Vae,
        "encoder.down_blocks.0.resnets.0.nin_shortcut.weight",
    )
    .unwrap_err();
    assert!(err.contains("read back as another tensor"), "{err}");
}

#[test]
fn layout_is_read_off_the_keys() {
    let keys = [
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.6.0.op.weight",
        "model.diffusion_model.output_blocks.8.0.in_layers.0.weight",
        "first_stage_model.decoder.up.1.block.0.conv1.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ];
    let layout = LdmLayout::detect(keys.iter().copied()).unwrap();
    assert_eq!(
        layout,
        LdmLayout {
            layers_per_block: 2,
            vae_up_blocks: 2,
            text_encoder: TextEncoderLayout::Clip
        }
    );
    let err = LdmLayout::detect(["unet.conv_in.weight"].iter().copied()).unwrap_err();
    assert!(err.to_string().contains("not a single-file"), "{err}");
}

/// Indices no model has are refused without listing rules for them: a hostile file's keys
/// (the VAE's rules grow with the square of the index) cannot stall the reader.
#[test]
fn huge_indices_are_refused_quickly() {
    for i in 0..2000 {
        let key = format!(
            "{VAE_PREFIX}encoder.down.{}.block.99999.conv1.weight",
            1000 + i
        );
        let err = layout().diffusers_name(&key).unwrap_err().to_string();
        assert!(err.contains("follows no known LDM pattern"), "{err}");
    }
    let keys = [
        format!("{UNET_PREFIX}input_blocks.1.0.in_layers.0.weight"),
        format!("{UNET_PREFIX}output_blocks.99999.0.in_layers.0.weight"),
        format!("{OPEN_CLIP_PREFIX}token_embedding.weight"),
    ];
    let err = LdmLayout::detect(keys.iter().map(String::as_str)).unwrap_err();
    assert!(
        err.to_string()
            .contains("no Stable Diffusion model has more than"),
        "{err}"
    );
}

/// SDXL's SGM layout: both encoders under `conditioner.embedders.`, the second one's projection
/// transposed, the added conditioning under `label_emb`; key names as the fixture script and
/// diffusers' `from_single_file` have them.
#[test]
fn sdxl_keys_map_both_ways() {
    let keys = [
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.6.0.op.weight",
        "model.diffusion_model.output_blocks.8.0.in_layers.0.weight",
        "first_stage_model.decoder.up.3.block.0.conv1.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.ln_final.weight",
    ];
    let sdxl = LdmLayout::detect(keys.iter().copied()).unwrap();
    assert_eq!(
        sdxl,
        LdmLayout {
            layers_per_block: 2,
            vae_up_blocks: 4,
            text_encoder: TextEncoderLayout::Sdxl
        }
    );
    let err = LdmLayout::detect(keys[..5].iter().copied()).unwrap_err();
    assert!(err.to_string().contains("second text encoder"), "{err}");

    let up_attn = [0, 1];
    let te2 = ModelPart::TextEncoder2;
    for (key, part, name) in [
        (
            "model.diffusion_model.label_emb.0.2.bias",
            ModelPart::Unet,
            "add_embedding.linear_2.bias",
        ),
        (
            "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight",
            ModelPart::Unet,
            "down_blocks.2.attentions.0.transformer_blocks.9.attn2.to_k.weight",
        ),
        (
            "model.diffusion_model.output_blocks.5.2.conv.bias",
            ModelPart::Unet,
            "up_blocks.1.upsamplers.0.conv.bias",
        ),
        (
            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
            ModelPart::TextEncoder,
            "text_model.encoder.layers.0.self_attn.q_proj.weight",
        ),
        (
            "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_proj.bias",
            te2,
            "text_model.encoder.layers.31.mlp.fc2.bias",
        ),
        (
            "conditioner.embedders.1.model.positional_embedding",
            te2,
            "text_model.embeddings.position_embedding.weight",
        ),
    ] {
        let t = DiffusersTensor::new(part, name);
        assert_eq!(
            sdxl.diffusers_name(key).unwrap(),
            LdmTensor::Renamed(t.clone()),
            "{key}"
        );
        assert_eq!(sdxl.ldm_key(&t, &up_attn).unwrap().key(), key, "{t:?}");
    }
    let projection = "conditioner.embedders.1.model.text_projection";
    let t = DiffusersTensor::new(te2, "text_projection.weight");
    assert_eq!(
        sdxl.diffusers_name(projection).unwrap(),
        LdmTensor::Transposed(t.clone())
    );
    assert_eq!(
        sdxl.ldm_key(&t, &up_attn).unwrap(),
        LdmTarget::Transposed {
            key: projection.into()
        }
    );
    let LdmTensor::StackedQkv(parts) = sdxl
        .diffusers_name("conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight")
        .unwrap()
    else {
        panic!("stacked q/k/v")
    };
    assert_eq!(parts[2].part, te2);
    assert_eq!(
        parts[2].name,
        "text_model.encoder.layers.3.self_attn.v_proj.weight"
    );
    for other in [
        "conditioner.embedders.1.model.logit_scale",
        "conditioner.embedders.1.model.attn_mask",
    ] {
        assert_eq!(sdxl.diffusers_name(other).unwrap(), LdmTensor::Other);
    }
}
